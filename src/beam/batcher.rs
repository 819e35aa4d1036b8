//! Continuous batching: queries join a running batch at any step (while their KV fits in the
//! arena), every step runs one decoder pass over all of them, and finished queries leave with
//! their output and free their arena entries. `BeamSearch::run` is a batch admitted at once.

use super::{check_query, check_trie, finish, step, BeamSearch, Output, Query, State, StepRows};
use crate::backend::{Backend, KvRows, RowKv};
use crate::error::{Error, Result};
use crate::model::{Head, Model};
use crate::trie::Trie;

/// A query's handle in a [`Batcher`], in admission order.
pub type Ticket = u64;

/// A continuous batch: queries are admitted at any time (while their KV fits in the arena),
/// every [`Batcher::step`] runs one decoder pass over all of them (prefill rows of new ones, one
/// row per running beam of the others), and finished queries leave with their output, freeing
/// their arena entries for the next. `BeamSearch::run` is a batch admitted at once.
pub struct Batcher<'a, B: Backend> {
    model: &'a Model<B>,
    trie: &'a Trie,
    search: &'a mut BeamSearch<B>,
    /// Queries in flight, in admission order, and their tickets.
    states: Vec<State>,
    tickets: Vec<Ticket>,
    /// Free arena entry ranges, ascending and disjoint, merged when adjacent.
    free: Vec<std::ops::Range<u32>>,
    /// Entries queries may use (past the shared prefix).
    capacity: usize,
    next: Ticket,
    /// Decoder rows of the last step.
    last_rows: usize,
    /// Keep running finished queries' last rows (see [`Batcher::set_hold_finished`]).
    hold: bool,
    /// Those rows, and the arena entries they write, freed when no query is left.
    held: Vec<(StepRows, std::ops::Range<u32>)>,
}

impl<'a, B: Backend> Batcher<'a, B> {
    /// A batcher over `search`'s arena (grown to the shared prefix plus `entries`, made anew
    /// for another model) for `trie`'s codes. The shared prefix, if set, is prefilled here.
    #[allow(clippy::single_range_in_vec_init)] // one free range: all of it
    pub fn new(
        search: &'a mut BeamSearch<B>,
        model: &'a Model<B>,
        trie: &'a Trie,
        entries: usize,
    ) -> Result<Self> {
        check_trie(model, trie)?;
        let prefix_len = search.prefix.len();
        let total = prefix_len + entries;
        if total > u32::MAX as usize {
            return Err(Error::Input(format!(
                "{total} KV entries for one batch is too many"
            )));
        }
        let other_model = search.arena_model != model.id();
        if other_model || search.arena.as_ref().is_none_or(|a| a.entries() < total) {
            search.arena = None; // free the old one first
            search.arena = Some(model.new_arena(total)?);
            search.arena_model = model.id();
            search.prefix_ready = false;
        }
        let arena = search.arena.as_mut().expect("just made");
        if prefix_len > 0 && !search.prefix_ready {
            let rows: Vec<RowKv> = (0..prefix_len as u32)
                .map(|p| RowKv::contiguous(0, p))
                .collect();
            let batch = KvRows {
                rows: &rows,
                links: &[],
            };
            model.forward_rows(arena, &search.prefix, batch, Head::Full(&[]))?;
            search.prefix_ready = true;
        }
        Ok(Batcher {
            model,
            trie,
            search,
            states: Vec::new(),
            tickets: Vec::new(),
            free: vec![prefix_len as u32..total as u32],
            capacity: entries,
            next: 0,
            last_rows: 0,
            hold: false,
            held: Vec::new(),
        })
    }

    /// With stable rows on: a query that finishes keeps its last decode step's rows in every
    /// later step (their KV written again into its own entries, held until the batch is empty;
    /// nothing reads them), so a batch admitted at once keeps one pass shape from its first
    /// decode step to its last, and the CUDA backend replays one graph instead of running each
    /// new shape as plain launches or capturing it. Results are the same. For a batch that
    /// admits no query while it runs: the held entries are not free for new queries until
    /// every query has finished. `BeamSearch::run` turns it on where the backend asks
    /// ([`crate::backend::Backend::hold_finished_rows`]: CUDA up to 256 beam slots in the batch).
    pub fn set_hold_finished(&mut self, on: bool) {
        self.hold = on;
        if !on {
            self.release_held();
        }
    }

    /// Arena entries `query` would hold while it runs.
    pub fn entries_for(&self, query: &Query) -> usize {
        State::entries(query, self.search.shared(&query.prompt), self.trie)
    }

    /// Queries admitted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.states.len()
    }

    /// Arena entries free now (possibly in several pieces).
    pub fn free_entries(&self) -> usize {
        self.free.iter().map(|r| r.len()).sum()
    }

    /// Admits `query` to the next step. `Ok(None)`: its KV does not fit until some queries in
    /// flight finish. An error: the query is invalid, or could never fit this batcher.
    pub fn admit(&mut self, query: Query) -> Result<Option<Ticket>> {
        check_query(self.model, &query, self.trie)?;
        // A query joining changes the pass shape anyway: held rows have no purpose left.
        self.release_held();
        let shared = self.search.shared(&query.prompt);
        let need = State::entries(&query, shared, self.trie);
        if need > self.capacity {
            return Err(Error::Input(format!(
                "the query needs {need} KV entries, the batch holds {}",
                self.capacity
            )));
        }
        let Some(at) = self.free.iter().position(|r| r.len() >= need) else {
            return Ok(None);
        };
        let base = self.free[at].start;
        self.free[at].start += need as u32;
        if self.free[at].is_empty() {
            self.free.remove(at);
        }
        let ticket = self.next;
        self.next += 1;
        self.tickets.push(ticket);
        self.states
            .push(State::new(query, base, need as u32, shared));
        Ok(Some(ticket))
    }

    /// One decoder pass over every query in flight; returns those that finished, with their
    /// outputs, and frees their entries. A query whose rows gave a log-probability that is not
    /// finite finishes with that [`Error::Numeric`] and the others go on. On an error of the
    /// step itself every query in flight is dropped (their arena entries may hold partial KV)
    /// and the batcher is empty.
    #[allow(clippy::single_range_in_vec_init)] // one free range: all of it
    pub fn step(&mut self) -> Result<Vec<(Ticket, Result<Output>)>> {
        if self.states.is_empty() {
            self.release_held();
            return Ok(Vec::new());
        }
        let prefill: Vec<bool> = self.states.iter().map(|s| !s.prefilled).collect();
        let t = std::time::Instant::now();
        let held_rows: usize = self.held.iter().map(|h| h.0.rows.len()).sum();
        let pad = self.search.stable_rows.unwrap_or_else(|| {
            // Every started query's beam slots (the rows a padded step runs, prefills aside).
            let slots: usize = self
                .states
                .iter()
                .filter(|s| s.active() && s.prefilled)
                .map(|s| s.options.beam)
                .sum();
            let limit = self.model.backend.stable_beam_rows();
            limit > 0 && slots + held_rows <= limit
        });
        if !pad {
            self.release_held();
        }
        let hold = self.hold && pad;
        let held: Vec<&StepRows> = self.held.iter().map(|h| &h.0).collect();
        let arena = self.search.arena.as_mut().expect("made by new");
        match step(
            self.model,
            arena,
            self.trie,
            &mut self.states,
            pad,
            hold,
            &held,
        ) {
            Ok(rows) => self.last_rows = rows,
            Err(e) => {
                let start = self.search.prefix.len() as u32;
                self.free = vec![start..start + self.capacity as u32];
                self.states.clear();
                self.tickets.clear();
                self.held.clear();
                self.last_rows = 0;
                return Err(e);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        for (s, prefill) in self.states.iter_mut().zip(prefill) {
            if prefill {
                s.prefill_s += secs;
            } else {
                s.decode_s += secs;
            }
        }
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.states.len() {
            if self.states[i].active() {
                i += 1;
                continue;
            }
            let mut s = self.states.remove(i);
            let ticket = self.tickets.remove(i);
            let entries = s.base..s.base + s.len;
            match s.last.take() {
                Some(rows) if hold => self.held.push((rows, entries)),
                _ => self.release(entries),
            }
            let out = match s.failed.take() {
                Some(msg) => Err(Error::Numeric(msg)),
                None => Ok(finish(self.trie, s)),
            };
            done.push((ticket, out));
        }
        if self.states.is_empty() {
            self.release_held();
        }
        Ok(done)
    }

    /// Frees the held rows' entries.
    fn release_held(&mut self) {
        for (_, entries) in std::mem::take(&mut self.held) {
            self.release(entries);
        }
    }

    /// Decoder rows the last step ran: prompt rows of new queries, one per running beam of the
    /// others, and the fillers and held rows of stable rows.
    pub fn last_step_rows(&self) -> usize {
        self.last_rows
    }

    /// Drops the query `ticket` (its caller has gone): it takes no further step and its arena
    /// entries are free at once. `false` when it is not in flight (finished or unknown).
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        let Some(i) = self.tickets.iter().position(|&t| t == ticket) else {
            return false;
        };
        self.tickets.remove(i);
        let s = self.states.remove(i);
        self.release(s.base..s.base + s.len);
        if self.states.is_empty() {
            self.release_held();
        }
        true
    }

    /// Returns `range` to the free list, merging it with its neighbours.
    fn release(&mut self, range: std::ops::Range<u32>) {
        let at = self.free.partition_point(|r| r.start < range.start);
        self.free.insert(at, range);
        if at + 1 < self.free.len() && self.free[at].end == self.free[at + 1].start {
            let next = self.free.remove(at + 1);
            self.free[at].end = next.end;
        }
        if at > 0 && self.free[at - 1].end == self.free[at].start {
            let this = self.free.remove(at);
            self.free[at - 1].end = this.end;
        }
    }
}
