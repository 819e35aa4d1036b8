use super::{
    check_length_penalty, length_factor, may_improve, BeamOptions, Normalize, MAX_LENGTH_PENALTY,
};

/// HF keeps the best 2B candidates of a step, so that B may finish with EOS and B still
/// run: beam 2, both best candidates EOS, and both beams' children run on.
#[test]
fn a_step_keeps_twice_the_beam_of_candidates() {
    use super::{advance, Beam, Query, State};
    use crate::beam::select::Candidate;
    use crate::trie::{CodeSet, Trie};
    let set = CodeSet {
        texts: ["a", "ab", "c", "cd"].map(String::from).to_vec(),
        tokens: vec![1, 1, 2, 3, 3, 4],
        offsets: vec![0, 1, 3, 4, 6],
    };
    let (vocab, eos) = (10, 9);
    let trie = Trie::build(&set, vocab, eos).unwrap();
    let options = BeamOptions {
        beam: 2,
        ..Default::default()
    };
    let query = Query {
        prompt: vec![5],
        options,
    };
    let mut s = State::new(query, 0, 0, 0);
    let beam = |t: u32| Beam {
        node: trie.walk(&[t]).unwrap(),
        score: 0.0,
        tokens: vec![t],
        logprobs: vec![0.0],
        entries: vec![],
    };
    let parents = vec![beam(1), beam(3)];
    s.beams = parents.clone();
    let c = |beam: u32, token: u32, logprob: f32| Candidate {
        score: logprob,
        beam,
        token,
        logprob,
    };
    let cands = vec![
        c(0, eos, -0.1),
        c(0, 2, -3.0),
        c(1, eos, -0.2),
        c(1, 4, -2.5),
    ];
    advance(&trie, &mut s, &parents, cands);
    assert_eq!(s.finished.len(), 2, "{:?}", s.finished);
    let running: Vec<Vec<u32>> = s.beams.iter().map(|b| b.tokens.clone()).collect();
    assert_eq!(running, [vec![3, 4], vec![1, 2]]);
}

/// HF stops on a tie (`worst_score >= highest attainable`): equal is not an improvement.
#[test]
fn a_tie_with_the_worst_finished_score_stops() {
    assert!(!may_improve(-2.0, 2.0, -1.0));
    assert!(may_improve(-1.9, 2.0, -1.0));
    assert!(!may_improve(-2.1, 2.0, -1.0));
    assert!(!may_improve(-1.0, 1.0, -1.0));
}

/// Python's `n ** 0.6` rounded to f32 (`struct.pack('f', n ** 0.6)`): 3, 7 and 100 are
/// lengths where rounding the penalty to f32 first gave the next f32 up.
#[test]
fn the_length_factor_is_pythons() {
    for (n, bits) in [
        (2, 0x3fc2_0300u32),
        (3, 0x3ff7_7282),
        (7, 0x404d_b3bf),
        (100, 0x417d_953a),
    ] {
        assert_eq!(length_factor(n, 0.6).to_bits(), bits, "{n}");
    }
}

#[test]
fn options_out_of_range_are_refused_by_name() {
    let ok = BeamOptions::default();
    assert!(ok.check().is_ok());
    for (lp, max_new) in [
        (MAX_LENGTH_PENALTY, 256),
        (-MAX_LENGTH_PENALTY, 1),
        (-3.9, 16),
        (-1.4, 256),
        (0.0, 16),
        (0.6, 16),
    ] {
        let o = BeamOptions {
            length_penalty: lp,
            max_new_tokens: max_new,
            ..ok
        };
        assert!(o.check().is_ok(), "{lp} {max_new}");
        // And the length rule at that many tokens (what `check_for` adds for a search).
        assert!(check_length_penalty(lp, max_new).is_ok(), "{lp} {max_new}");
    }
    // Negative penalties whose scores could pass transformers' -1e9 placeholders, by the
    // longest sequence: refused, naming the smallest penalty taken (which is taken).
    for (lp, longest, says, taken) in [
        (-4.0, 16, "-3.98 or more", -3.98),
        (-1.5, 256, "-1.49 or more", -1.49),
        (-3.0, 32, "-2.98 or more", -2.98),
        (-5.0, 10, "-4.99 or more", -4.99),
        (-6.8, 6, "-6.71 or more", -6.71),
    ] {
        let e = check_length_penalty(lp, longest).unwrap_err().to_string();
        assert!(
            e.contains("could pass -1e9") && e.contains(says),
            "{lp}: {e}"
        );
        assert!(
            check_length_penalty(taken, longest).is_ok(),
            "{taken} at {longest}"
        );
    }
    for (lp, longest) in [(-10.0, 1), (-3.9, 16), (0.5, 256), (-1.4, 256)] {
        assert!(
            check_length_penalty(lp, longest).is_ok(),
            "{lp} at {longest}"
        );
    }
    for lp in [10.5, -20.0, -200.0, f64::NAN, f64::INFINITY] {
        let o = BeamOptions {
            length_penalty: lp,
            ..ok
        };
        let e = o.check().unwrap_err().to_string();
        assert!(
            e.contains("length_penalty") && e.contains("out of range"),
            "{lp}: {e}"
        );
    }
    for (beam, max_new, normalize, constrained, says) in [
        (0, 16, Normalize::Full, true, "beam width 0"),
        (513, 16, Normalize::Full, true, "beam width 513"),
        (4, 0, Normalize::Full, true, "max_new_tokens 0"),
        (4, 257, Normalize::Full, true, "max_new_tokens 257"),
        (4, 16, Normalize::Children, false, "needs the trie"),
    ] {
        let o = BeamOptions {
            beam,
            max_new_tokens: max_new,
            normalize,
            constrained,
            ..ok
        };
        let e = o.check().unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
}

/// The module docs' example of transformers' stopping rule (4.50 and later): beam 2, length
/// penalty 2, codes `a`, `b`, `a x`. After the second step `a` and `b` fill the finished slots
/// (−1.9 / 2² = −0.475, −2.0 / 2² = −0.5) and the running `a x` (sum −2.2) can reach at best
/// −2.2 / 2² = −0.55 at the current length: done, with {a, b}. (The older rule, which compared
/// against the best of the step's candidates, went on and returned {a x, a}: `a x` ends at
/// −2.21 / 3² ≈ −0.246.)
#[test]
fn the_stopping_rule_of_the_module_docs_example() {
    use crate::trie::{CodeSet, Trie};
    let (vocab, eos, filler) = (10usize, 9u32, 5usize);
    let set = CodeSet {
        texts: ["a", "b", "a x"].map(String::from).to_vec(),
        tokens: vec![1, 2, 1, 3],
        offsets: vec![0, 1, 2, 4],
    };
    let trie = Trie::build(&set, vocab, eos).unwrap();
    // A logits row whose log-softmax is `lps` at its tokens: the rest of the mass on a token no
    // code takes.
    let row = |lps: &[(u32, f32)]| {
        let mut r = vec![f32::NEG_INFINITY; vocab];
        let rest: f64 = 1.0 - lps.iter().map(|&(_, l)| (l as f64).exp()).sum::<f64>();
        assert!(rest > 0.0);
        r[filler] = rest.ln() as f32;
        for &(t, l) in lps {
            r[t as usize] = l;
        }
        r
    };
    let options = BeamOptions {
        beam: 2,
        length_penalty: 2.0,
        ..Default::default()
    };
    // The codes returned when `a x` takes log-prob `ax` after `a` (the rest as above).
    let run = |ax: f32| {
        let out = super::search_logits(&trie, options, |_, _, tokens| match tokens {
            [] => row(&[(1, -1.0), (2, -1.1)]),
            [1] => row(&[(eos, -0.9), (3, ax)]),
            [2] => row(&[(eos, -0.9)]),
            [1, 3] => row(&[(eos, -0.01)]),
            t => panic!("no logits for {t:?}"),
        })
        .unwrap();
        out.codes
    };
    let codes = run(-1.2);
    let got: Vec<Option<u32>> = codes.iter().map(|c| c.code).collect();
    assert_eq!(got, [Some(0), Some(1)], "{codes:?}");
    for (c, want) in codes.iter().zip([-0.475f32, -0.5]) {
        assert!((c.score - want).abs() < 1e-5, "{codes:?}");
    }
    // With `a x` (−1.95) between the two EOS candidates, `b`'s EOS ranks third of the step's
    // candidates: only the top B may finish, so `b` is dropped, `a x` runs on and ends at
    // −1.96 / 3² ≈ −0.218, first.
    let codes = run(-0.95);
    let got: Vec<Option<u32>> = codes.iter().map(|c| c.code).collect();
    assert_eq!(got, [Some(2), Some(0)], "{codes:?}");
}
