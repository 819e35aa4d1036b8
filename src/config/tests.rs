//! `config.json` and `generation_config.json` against transformers' reading of them.

use super::*;

const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,
    "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
    "num_key_value_heads":3,"vocab_size":49152,"rope_theta":100000.0,
    "rms_norm_eps":1e-5,"tie_word_embeddings":true,"eos_token_id":2,"bos_token_id":1}"#;

#[test]
fn derives_dimensions() {
    let c = ModelConfig::from_json(LLAMA).unwrap();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.kv_dim(), 192);
    assert_eq!(c.q_dim(), 576);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
    // The file's eps, not the default (every fixture model has the default's 1e-6).
    assert_eq!(c.rms_norm_eps, 1e-5);
    let without = LLAMA.replace(r#""rms_norm_eps":1e-5,"#, "");
    assert_eq!(ModelConfig::from_json(&without).unwrap().rms_norm_eps, 1e-6);
}

#[test]
fn generation_config_adds_its_end_tokens_after_config_json() {
    let dir = std::env::temp_dir().join(format!("gram-genconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("generation_config.json");
    let c = || ModelConfig::from_json(LLAMA).unwrap();
    // No file: config.json's alone.
    assert_eq!(
        c().with_generation_config(&path).unwrap().eos_token_ids,
        vec![2]
    );
    std::fs::write(&path, r#"{"eos_token_id": [7, 2], "bos_token_id": 1}"#).unwrap();
    assert_eq!(
        c().with_generation_config(&path).unwrap().eos_token_ids,
        vec![2, 7]
    );
    std::fs::write(&path, r#"{"eos_token_id": 9}"#).unwrap();
    assert_eq!(
        c().with_generation_config(&path).unwrap().eos_token_ids,
        vec![2, 9]
    );
    std::fs::write(&path, r#"{"do_sample": false}"#).unwrap();
    assert_eq!(
        c().with_generation_config(&path).unwrap().eos_token_ids,
        vec![2]
    );
    // A stop token past the vocabulary (49152) can never be generated: dropped.
    std::fs::write(&path, r#"{"eos_token_id": [49152, 9]}"#).unwrap();
    assert_eq!(
        c().with_generation_config(&path).unwrap().eos_token_ids,
        vec![2, 9]
    );
    std::fs::write(&path, r#"{"eos_token_id": "x"}"#).unwrap();
    let e = c().with_generation_config(&path).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id"),
        "{e}"
    );
    std::fs::write(&path, "{").unwrap();
    let e = c().with_generation_config(&path).unwrap_err().to_string();
    assert!(e.contains("not valid JSON"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What transformers' beam search would apply from a generation_config.json and gram's
/// does not: named with their values; no-op values and sampling-only keys are left out.
#[test]
fn generation_settings_beam_search_ignores_are_named() {
    let v: Value = serde_json::from_str(
        r#"{"repetition_penalty": 1.05, "length_penalty": 1.0, "temperature": 0.7,
        "top_p": 0.8, "do_sample": true, "no_repeat_ngram_size": 0, "suppress_tokens": [],
        "bad_words_ids": [[5]], "early_stopping": false, "forced_eos_token_id": null,
        "min_new_tokens": 2}"#,
    )
    .unwrap();
    assert_eq!(
        beam_search_settings(&v),
        [
            "repetition_penalty = 1.05",
            "min_new_tokens = 2",
            "bad_words_ids = [[5]]"
        ]
    );
    let v: Value = serde_json::from_str(r#"{"early_stopping": "never"}"#).unwrap();
    assert_eq!(beam_search_settings(&v), ["early_stopping = \"never\""]);
    let plain: Value = serde_json::from_str(r#"{"eos_token_id": 2, "bos_token_id": 1}"#).unwrap();
    assert!(beam_search_settings(&plain).is_empty());
}

/// Each config that would give wrong numbers, or none, is refused by name.
#[test]
fn absurd_fields_are_refused_by_name() {
    for (from, to, says) in [
        (r#""hidden_size":576"#, r#""hidden_size":0"#, "hidden_size"),
        (r#""vocab_size":49152"#, r#""vocab_size":0"#, "vocab_size"),
        (
            r#""num_key_value_heads":3"#,
            r#""num_key_value_heads":0"#,
            "num_key_value_heads",
        ),
        (
            r#""hidden_size":576"#,
            r#""hidden_size":577"#,
            "not a multiple of num_attention_heads",
        ),
        (
            r#""hidden_size":576"#,
            r#""hidden_size":576,"head_dim":63"#,
            "head_dim",
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_theta":-1.0"#,
            "rope_theta",
        ),
        (
            r#""rms_norm_eps":1e-5"#,
            r#""rms_norm_eps":-1e-5"#,
            "rms_norm_eps",
        ),
        (
            r#""vocab_size":49152"#,
            r#""vocab_size":49152,"hidden_act":"gelu""#,
            "gelu",
        ),
        (
            r#""vocab_size":49152"#,
            r#""vocab_size":49152,"max_position_embeddings":0"#,
            "max_position_embeddings",
        ),
        (
            r#""vocab_size":49152"#,
            r#""vocab_size":49152,"use_sliding_window":true"#,
            "sliding",
        ),
    ] {
        assert!(LLAMA.contains(from), "{from}");
        let text = LLAMA.replace(from, to);
        let e = ModelConfig::from_json(&text).expect_err(to);
        assert!(e.contains(says), "{to}: {e}");
    }
}

/// transformers loads by `model_type`: one that disagrees with `architectures` (a Mistral
/// config naming the Llama class) is refused; one that agrees, or none, is taken.
#[test]
fn a_model_type_other_than_the_architecture_is_refused() {
    let with = |mt: &str| {
        LLAMA.replace(
            r#""architectures":["LlamaForCausalLM"],"#,
            &format!(r#""architectures":["LlamaForCausalLM"],"model_type":"{mt}","#),
        )
    };
    assert_eq!(
        ModelConfig::from_json(&with("llama")).unwrap().arch,
        Arch::Llama
    );
    for mt in ["mistral", "qwen2"] {
        let e = ModelConfig::from_json(&with(mt)).unwrap_err();
        assert!(e.contains(&format!("`model_type` is `{mt}`")), "{e}");
    }
    let only_type = LLAMA.replace(
        r#""architectures":["LlamaForCausalLM"],"#,
        r#""model_type":"qwen3","#,
    );
    assert_eq!(
        ModelConfig::from_json(&only_type).unwrap().arch,
        Arch::Qwen3
    );
}

#[test]
fn transformers5_rope_parameters() {
    let text = LLAMA.replace(
        r#""rope_theta":100000.0"#,
        r#""rope_parameters":{"rope_theta":5e5,"rope_type":"default"}"#,
    );
    assert_eq!(ModelConfig::from_json(&text).unwrap().rope_theta, 5e5);
    // Two spellings of one base agree; two that differ are refused (transformers 4 reads
    // the top-level one, 5 the object's), naming both.
    let both = |inner: &str| {
        LLAMA.replace(
            r#""rope_theta":100000.0"#,
            &format!(r#""rope_theta":100000.0,"rope_parameters":{{"rope_theta":{inner}}}"#),
        )
    };
    assert_eq!(
        ModelConfig::from_json(&both("1e5")).unwrap().rope_theta,
        1e5
    );
    let e = ModelConfig::from_json(&both("5e5")).unwrap_err();
    assert!(
        e.contains("rope_theta is 100000 but rope_parameters.rope_theta is 500000"),
        "{e}"
    );
}

/// A non-empty `rope_scaling` is taken over `rope_parameters` whole, as transformers 5 takes
/// it (`rope_scaling or rope_parameters`; transformers 4 never reads the second): the
/// second's base is not read then, and without a top-level one the base is the default.
#[test]
fn rope_scaling_is_taken_over_rope_parameters() {
    let both = LLAMA.replace(
        r#""rope_theta":100000.0"#,
        r#""rope_scaling":{"rope_type":"default"},"rope_parameters":{"rope_type":"default","rope_theta":5e5}"#,
    );
    assert_eq!(ModelConfig::from_json(&both).unwrap().rope_theta, 10000.0);
    // rope_parameters' own scaling kind is not read either.
    let linear = both.replace(
        r#""rope_parameters":{"rope_type":"default""#,
        r#""rope_parameters":{"rope_type":"linear""#,
    );
    assert_eq!(ModelConfig::from_json(&linear).unwrap().rope_theta, 10000.0);
    // An empty rope_scaling gives way to rope_parameters.
    let empty = both.replace(
        r#""rope_scaling":{"rope_type":"default"}"#,
        r#""rope_scaling":{}"#,
    );
    assert_eq!(ModelConfig::from_json(&empty).unwrap().rope_theta, 5e5);
}

/// `linear` and `llama3` scaling are read from either spelling (transformers 4's
/// `rope_scaling` with the old `type` key too) with their values; one missing a key, with a
/// factor below 1 or its bands the wrong way round is refused by name, as are the kinds
/// transformers computes per call (`dynamic`) or with an attention factor (`yarn`).
#[test]
fn rope_scalings_read_and_refused() {
    let llama3 = r#"{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#;
    let want = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let with = |key: &str, obj: &str| {
        LLAMA.replace(
            r#""rope_theta":100000.0"#,
            &format!(r#""rope_theta":500000.0,"{key}":{obj}"#),
        )
    };
    for key in ["rope_scaling", "rope_parameters"] {
        let c = ModelConfig::from_json(&with(key, llama3)).unwrap();
        assert_eq!((c.rope_scaling, c.rope_theta), (want, 5e5), "{key}");
    }
    let old_spelling = with("rope_scaling", r#"{"type":"linear","factor":2}"#);
    assert_eq!(
        ModelConfig::from_json(&old_spelling).unwrap().rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    assert_eq!(
        ModelConfig::from_json(LLAMA).unwrap().rope_scaling,
        RopeScaling::None
    );
    for (obj, says) in [
        (
            llama3.replace(r#""low_freq_factor":1.0,"#, ""),
            "needs `low_freq_factor`",
        ),
        (
            llama3.replace("32.0", "0.5"),
            "factor (0.5) must be at least 1",
        ),
        (
            llama3.replace(r#""high_freq_factor":4.0"#, r#""high_freq_factor":1.0"#),
            "must be below high_freq_factor",
        ),
        (
            llama3.replace("8192", r#""8192""#),
            "original_max_position_embeddings must be a positive number",
        ),
        (r#"{"rope_type":"linear"}"#.into(), "needs `factor`"),
        (
            r#"{"rope_type":"dynamic","factor":2.0}"#.into(),
            "unsupported rope_scaling.rope_type `dynamic`",
        ),
        (
            r#"{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":4096}"#.into(),
            "unsupported rope_scaling.rope_type `yarn`",
        ),
        (
            r#"{"full_attention":{"rope_type":"default","rope_theta":1e4}}"#.into(),
            "nested by layer type (`full_attention`)",
        ),
    ] {
        let e = ModelConfig::from_json(&with("rope_scaling", &obj)).unwrap_err();
        assert!(e.contains(says), "{obj}: {e}");
    }
    // A top-level original_max_position_embeddings (which transformers 5 sets over the
    // nested one): taken when the nested one is absent, refused when they disagree.
    let top = |n: &str, obj: &str| {
        with("rope_scaling", obj).replace(
            r#""hidden_size":576,"#,
            &format!(r#""hidden_size":576,"original_max_position_embeddings":{n},"#),
        )
    };
    let c = ModelConfig::from_json(&top("8192", llama3)).unwrap();
    assert_eq!(c.rope_scaling, want);
    let without = llama3.replace(r#","original_max_position_embeddings":8192"#, "");
    assert_ne!(without, llama3);
    let c = ModelConfig::from_json(&top("8192", &without)).unwrap();
    assert_eq!(c.rope_scaling, want);
    let e = ModelConfig::from_json(&top("100", llama3)).unwrap_err();
    assert!(
        e.contains("original_max_position_embeddings is 100 but"),
        "{e}"
    );
}

/// An absent `eos_token_id` is no end token, for Llama too (whose config class defaults
/// the attribute to 2): transformers 5's `generate` reads the file's keys, and does not
/// stop there.
#[test]
fn an_absent_eos_is_none() {
    for arch in ["LlamaForCausalLM", "Qwen2ForCausalLM"] {
        let absent = LLAMA
            .replace(r#","eos_token_id":2"#, "")
            .replace("LlamaForCausalLM", arch);
        assert!(ModelConfig::from_json(&absent)
            .unwrap()
            .eos_token_ids
            .is_empty());
    }
}

#[test]
fn other_layer_kinds_are_refused() {
    let qwen = LLAMA.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
    let with = |extra: &str| qwen.replace(r#""vocab_size""#, &format!(r#"{extra},"vocab_size""#));
    let full = format!(
        r#""layer_types":[{}]"#,
        vec![r#""full_attention""#; 30].join(",")
    );
    assert!(ModelConfig::from_json(&with(&full)).is_ok());
    assert!(ModelConfig::from_json(&with(r#""layer_types":null"#)).is_ok());
    // transformers' older name for a full layer.
    let old_name = full.replacen("full_attention", "attention", 1);
    assert!(ModelConfig::from_json(&with(&old_name)).is_ok());
    let sliding = full.replacen("full_attention", "sliding_attention", 1);
    let e = ModelConfig::from_json(&with(&sliding)).unwrap_err();
    assert!(
        e.contains("sliding_attention") && e.contains("layer_types"),
        "{e}"
    );
    let e = ModelConfig::from_json(&with(r#""layer_types":"full_attention""#)).unwrap_err();
    assert!(e.contains("must be a list"), "{e}");
    let e =
        ModelConfig::from_json(&with(r#""per_layer_config":{"0":{"head_dim":32}}"#)).unwrap_err();
    assert!(e.contains("per_layer_config"), "{e}");
    assert!(ModelConfig::from_json(&with(r#""per_layer_config":null"#)).is_ok());
    // What transformers writes for a per-layer config without overrides.
    assert!(ModelConfig::from_json(&with(r#""per_layer_config":{}"#)).is_ok());
}

/// An absent `num_key_value_heads` is transformers' default: the head count for Llama, 32
/// for Qwen2 and Qwen3 (so 9 heads without the key is refused there, as HF cannot load it).
#[test]
fn absent_kv_heads_default_as_in_transformers() {
    let no_kv = LLAMA.replace(r#""num_key_value_heads":3,"#, "");
    assert_eq!(
        ModelConfig::from_json(&no_kv).unwrap().num_key_value_heads,
        9
    );
    let qwen = no_kv.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
    let e = ModelConfig::from_json(&qwen).unwrap_err();
    assert!(e.contains("num_key_value_heads (32)"), "{e}");
    let qwen64 = qwen
        .replace(r#""num_attention_heads":9"#, r#""num_attention_heads":64"#)
        .replace(r#""hidden_size":576"#, r#""hidden_size":4096"#);
    assert_eq!(
        ModelConfig::from_json(&qwen64).unwrap().num_key_value_heads,
        32
    );
    // `null` is the head count, for every architecture.
    let null = qwen.replace(
        r#""vocab_size""#,
        r#""num_key_value_heads":null,"vocab_size""#,
    );
    assert_eq!(
        ModelConfig::from_json(&null).unwrap().num_key_value_heads,
        9
    );
}

/// transformers builds Qwen2's and Qwen3's MLPs without biases whatever `mlp_bias` says;
/// Llama's follow it.
#[test]
fn mlp_bias_is_read_for_llama_only() {
    let with = |c: &str| {
        c.replace(
            r#""hidden_size":576,"#,
            r#""hidden_size":576,"mlp_bias":true,"#,
        )
    };
    assert!(ModelConfig::from_json(&with(LLAMA)).unwrap().mlp_bias);
    for arch in ["Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
        let c = ModelConfig::from_json(&with(&LLAMA.replace("LlamaForCausalLM", arch))).unwrap();
        assert!(!c.mlp_bias, "{arch}");
    }
}

#[test]
fn clear_errors() {
    let missing = LLAMA.replace(r#""hidden_size":576,"#, "");
    assert_eq!(
        ModelConfig::from_json(&missing).unwrap_err(),
        "missing field `hidden_size`"
    );
    let unknown = LLAMA.replace("LlamaForCausalLM", "GPT2LMHeadModel");
    assert!(ModelConfig::from_json(&unknown)
        .unwrap_err()
        .contains("unsupported architecture `GPT2LMHeadModel`"));
    // Absurd sizes (a corrupt file) are refused before anything is allocated from them.
    let huge = LLAMA.replace(r#""vocab_size":49152"#, r#""vocab_size":4294967296"#);
    assert_eq!(
        ModelConfig::from_json(&huge).unwrap_err(),
        "`vocab_size` (4294967296) is above 16777216"
    );
    let wide = LLAMA
        .replace(
            r#""num_attention_heads":9"#,
            r#""num_attention_heads":4294967296"#,
        )
        .replace(
            r#""num_key_value_heads":3"#,
            r#""num_key_value_heads":4294967296"#,
        )
        .replace(
            r#""hidden_size":576,"#,
            r#""hidden_size":576,"head_dim":4294967296,"#,
        );
    assert!(ModelConfig::from_json(&wide)
        .unwrap_err()
        .contains("is above"));
    let big_head = LLAMA.replace(
        r#""hidden_size":576,"#,
        r#""hidden_size":576,"head_dim":2048,"#,
    );
    assert!(ModelConfig::from_json(&big_head)
        .unwrap_err()
        .contains("`head_dim` (2048) is above 1024"));
    let gqa = LLAMA.replace(r#""num_key_value_heads":3"#, r#""num_key_value_heads":4"#);
    assert!(ModelConfig::from_json(&gqa)
        .unwrap_err()
        .contains("not a multiple"));
    let scaled = LLAMA.replace(
        r#""rope_theta":100000.0"#,
        r#""rope_scaling":{"rope_type":"yarn","factor":4}"#,
    );
    assert!(ModelConfig::from_json(&scaled)
        .unwrap_err()
        .contains("yarn"));
    // Scaling keys without a type are refused (transformers refuses them too), not run
    // unscaled; a type-less object with nothing but the base, or null, is plain rope.
    let untyped = LLAMA.replace(
        r#""rope_theta":100000.0"#,
        r#""rope_scaling":{"factor":8.0}"#,
    );
    let err = ModelConfig::from_json(&untyped).unwrap_err();
    assert!(
        err.contains("rope_scaling has `factor` but no rope_type"),
        "{err}"
    );
    for plain in [
        r#""rope_scaling":{"rope_theta":5e5}"#,
        r#""rope_scaling":{"rope_type":null}"#,
        r#""rope_scaling":{}"#,
    ] {
        let c = LLAMA.replace(r#""rope_theta":100000.0"#, plain);
        assert!(ModelConfig::from_json(&c).is_ok(), "{plain}");
    }
    assert!(ModelConfig::from_json("{")
        .unwrap_err()
        .contains("not valid JSON"));
    // Floats out of f32's range, and wrongly typed rope settings.
    let many_eos = format!(r#""eos_token_id":[{}]"#, vec!["2"; 1025].join(","));
    for (from, to, want) in [
        (
            r#""rms_norm_eps":1e-5"#,
            r#""rms_norm_eps":1e300"#,
            "rms_norm_eps (1e300) must be positive and finite in f32",
        ),
        (
            r#""rms_norm_eps":1e-5"#,
            r#""rms_norm_eps":1e-300"#,
            "rms_norm_eps",
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_theta":1e300"#,
            "rope_theta (1e300)",
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_theta":1e-300"#,
            "rope_theta",
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":{"rope_theta":"x","rope_type":"default"}"#,
            r#"rope_parameters.rope_theta must be a number, not "x""#,
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":5"#,
            "rope_parameters must be an object, not 5",
        ),
        (
            r#""eos_token_id":2"#,
            r#""eos_token_id":49152"#,
            "eos_token_id 49152 is not a token id (vocab_size 49152)",
        ),
        // A base that is a positive f32 but overflows the rotary frequencies (every logit
        // was NaN), or that overflows only the angles of the last positions.
        (
            r#""rope_theta":100000.0"#,
            r#""rope_theta":1e-40"#,
            "rope_theta (1e-40) gives rotary angles that overflow f32",
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_theta":1e-37"#,
            "gives rotary angles that overflow f32 at head_dim 64 and 2048 positions",
        ),
        // Rotating part of each head: refused at either place transformers reads it.
        (
            r#""rope_theta":100000.0"#,
            r#""rope_theta":100000.0,"partial_rotary_factor":0.5"#,
            "unsupported partial_rotary_factor 0.5",
        ),
        (
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":{"rope_theta":5e5,"rope_type":"default","partial_rotary_factor":0.25}"#,
            "unsupported rope_parameters.partial_rotary_factor 0.25",
        ),
        (
            r#""eos_token_id":2"#,
            many_eos.as_str(),
            "`eos_token_id` lists 1025 token ids; at most 1024",
        ),
    ] {
        let text = LLAMA.replace(from, to);
        assert_ne!(text, LLAMA, "{to}");
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(err.contains(want), "{to}: {err}");
    }
    // null is "not given".
    let null = LLAMA.replace(
        r#""rope_theta":100000.0"#,
        r#""rope_theta":100000.0,"rope_scaling":null"#,
    );
    assert_eq!(ModelConfig::from_json(&null).unwrap().rope_theta, 100000.0);
}
