//! The scheduler: which sequences wait, which are admitted, and what each step runs.
//!
//! Pure bookkeeping over sequence ids and byte counts, testable without a model. Each step
//! admits waiting sequences in arrival order while their memory fits the pool (the first
//! that does not fit blocks the ones behind it, so a large request is not starved), gives
//! one prefill chunk to the oldest admitted sequence still prefilling, and decodes every
//! sequence past its prefill together.
//!
//! Prefills run one at a time, so only one sequence at a time holds its prefill headroom
//! (see [`Reservation`]). A sequence reserves its settled bytes when admitted and its
//! headroom when its prefill starts; admission keeps room for the largest headroom any
//! admitted sequence still needs, so the prefill that comes next always fits:
//!
//! `reserved (headroom held aside) + max(headroom still needed) <= limit`.

use std::collections::VecDeque;

use crate::pool::KvPool;
use crate::sequence::{Reservation, SeqId};

/// Limits the scheduler enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Requests waiting for memory at most; more are refused.
    pub max_queue: usize,
    /// Sequences admitted at once at most (prefilling plus decoding).
    pub max_running: usize,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the queue is full ({max_queue} requests are waiting); retry later")]
    QueueFull { max_queue: usize },
    #[error(
        "the request needs {need} bytes of KV cache but the pool holds {limit} bytes; \
         use a smaller prompt, fewer max_tokens or a smaller compression budget"
    )]
    NeverFits { need: usize, limit: usize },
}

/// What one engine step runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sequences admitted this step (their reservation is made).
    pub admitted: Vec<SeqId>,
    /// The sequence that prefills one chunk.
    pub prefill: Option<SeqId>,
    /// Sequences that decode one token, together.
    pub decode: Vec<SeqId>,
}

/// Waiting, prefilling and decoding sequences.
#[derive(Debug, Clone)]
pub struct Scheduler {
    limits: SchedulerLimits,
    /// Sequences not yet admitted, in arrival order.
    waiting: VecDeque<(SeqId, Reservation)>,
    /// Admitted sequences still to prefill, oldest first, with the headroom each needs.
    prefilling: VecDeque<(SeqId, usize)>,
    decoding: Vec<SeqId>,
    /// The headroom the prefilling sequence holds in the pool now, if any.
    headroom_held: Option<(SeqId, usize)>,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
            headroom_held: None,
        }
    }

    /// Queues a sequence that will need `need`, or says why not.
    pub fn submit(&mut self, id: SeqId, need: Reservation, pool: &KvPool) -> Result<(), Refusal> {
        if !pool.can_ever_fit(need.peak()) {
            return Err(Refusal::NeverFits { need: need.peak(), limit: pool.limit() });
        }
        if self.waiting.len() >= self.limits.max_queue {
            return Err(Refusal::QueueFull { max_queue: self.limits.max_queue });
        }
        self.waiting.push_back((id, need));
        Ok(())
    }

    /// Admits what fits, reserves the headroom of the prefill that runs, and says what runs
    /// this step.
    pub fn schedule(&mut self, pool: &mut KvPool) -> Plan {
        let mut admitted = Vec::new();
        while let Some(&(id, need)) = self.waiting.front() {
            let held_aside = self.headroom_held.map_or(0, |(_, h)| h);
            let headroom = self.largest_headroom().max(need.headroom);
            let fits = pool.used() - held_aside + need.settled + headroom <= pool.limit();
            if self.running() >= self.limits.max_running || !fits {
                break;
            }
            let reserved = pool.try_reserve(id, need.settled);
            debug_assert!(reserved, "admission checked the room");
            self.waiting.pop_front();
            self.prefilling.push_back((id, need.headroom));
            admitted.push(id);
        }
        let mut prefill = self.prefilling.front().copied();
        if let Some((id, headroom)) = prefill {
            if self.headroom_held.is_none_or(|(held, _)| held != id) {
                // Fits by the admission invariant; waits a step if it ever did not.
                if pool.try_reserve(id, headroom) {
                    self.headroom_held = Some((id, headroom));
                } else {
                    prefill = None;
                }
            }
        }
        Plan { admitted, prefill: prefill.map(|(id, _)| id), decode: self.decoding.clone() }
    }

    /// The largest headroom an admitted sequence still needs for its prefill.
    fn largest_headroom(&self) -> usize {
        self.prefilling.iter().map(|&(_, h)| h).max().unwrap_or(0)
    }

    /// `id` finished its prefill: it decodes from the next step on. The caller settles its
    /// reservation to what it holds.
    pub fn prefilled(&mut self, id: SeqId) {
        if let Some(at) = self.prefilling.iter().position(|&(p, _)| p == id) {
            self.prefilling.remove(at);
            self.decoding.push(id);
        }
        self.release_headroom(id);
    }

    /// Forgets `id` wherever it is (finished or cancelled); the caller frees its memory.
    pub fn remove(&mut self, id: SeqId) {
        self.waiting.retain(|&(w, _)| w != id);
        self.prefilling.retain(|&(p, _)| p != id);
        self.decoding.retain(|&d| d != id);
        self.release_headroom(id);
    }

    fn release_headroom(&mut self, id: SeqId) {
        if self.headroom_held.is_some_and(|(held, _)| held == id) {
            self.headroom_held = None;
        }
    }

    /// Sequences waiting for memory.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted (prefilling or decoding).
    pub fn running(&self) -> usize {
        self.prefilling.len() + self.decoding.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_queue: usize, max_running: usize) -> SchedulerLimits {
        SchedulerLimits { max_queue, max_running }
    }

    /// A sequence that settles to `settled` bytes and needs `headroom` more to prefill.
    fn need(settled: usize, headroom: usize) -> Reservation {
        Reservation { settled, headroom }
    }

    #[test]
    fn admits_in_order_while_the_pool_has_room() {
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        for id in 1..=3 {
            s.submit(id, need(40, 0), &pool).unwrap();
        }
        let plan = s.schedule(&mut pool);
        assert_eq!(plan.admitted, vec![1, 2]);
        assert_eq!(plan.prefill, Some(1));
        assert!(plan.decode.is_empty());
        assert_eq!((s.waiting(), s.running(), pool.used()), (1, 2, 80));
    }

    #[test]
    fn only_the_running_prefill_holds_headroom_and_room_stays_for_the_largest() {
        // Settled 30 each, headroom 10 (the largest one 25): a pool of 100 admits three
        // (3 x 30 + 10 = 100) but not a fourth, and reserves headroom only for the prefill
        // that runs.
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        for id in 1..=4 {
            s.submit(id, need(30, 10), &pool).unwrap();
        }
        let plan = s.schedule(&mut pool);
        assert_eq!((plan.admitted, plan.prefill), (vec![1, 2, 3], Some(1)));
        assert_eq!((pool.held(1), pool.held(2), pool.used()), (40, 30, 100));
        // 1 settles to 28 bytes after its prompt; 2 takes the headroom, 4 still waits.
        pool.settle(1, 28);
        s.prefilled(1);
        let plan = s.schedule(&mut pool);
        assert_eq!((plan.admitted, plan.prefill, plan.decode), (vec![], Some(2), vec![1]));
        assert_eq!((pool.held(2), pool.used()), (40, 98));
        // A larger headroom behind them must fit beside the others.
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        s.submit(1, need(30, 10), &pool).unwrap();
        s.submit(2, need(30, 25), &pool).unwrap();
        s.submit(3, need(30, 10), &pool).unwrap();
        // 30 + 30 + 25 = 85 fits; with 3: 90 + 25 = 115 does not.
        assert_eq!(s.schedule(&mut pool).admitted, vec![1, 2]);
        assert_eq!(pool.used(), 70);
        pool.settle(1, 30);
        s.prefilled(1);
        assert_eq!(s.schedule(&mut pool).prefill, Some(2));
        assert_eq!(pool.used(), 85);
        s.remove(1);
        pool.free(1);
        // 2 holds 30 + its 25 of headroom: 30 + 30 + max(25, 10) = 85 fits.
        assert_eq!(s.schedule(&mut pool).admitted, vec![3]);
        assert!(pool.peak() <= pool.limit());
    }

    #[test]
    fn a_request_that_does_not_fit_blocks_later_ones() {
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        s.submit(1, need(70, 0), &pool).unwrap();
        s.submit(2, need(50, 0), &pool).unwrap();
        s.submit(3, need(10, 0), &pool).unwrap();
        assert_eq!(s.schedule(&mut pool).admitted, vec![1]);
        // 3 would fit, but 2 came first.
        assert!(s.schedule(&mut pool).admitted.is_empty());
        s.remove(1);
        pool.free(1);
        assert_eq!(s.schedule(&mut pool).admitted, vec![2, 3]);
    }

    #[test]
    fn prefill_one_chunk_at_a_time_and_decode_everyone_past_it() {
        let mut pool = KvPool::new(1000);
        let mut s = Scheduler::new(limits(8, 8));
        for id in 1..=3 {
            s.submit(id, need(10, 5), &pool).unwrap();
        }
        let plan = s.schedule(&mut pool);
        assert_eq!((plan.prefill, plan.decode.len()), (Some(1), 0));
        s.prefilled(1);
        let plan = s.schedule(&mut pool);
        assert_eq!((plan.prefill, plan.decode.clone()), (Some(2), vec![1]));
        s.prefilled(2);
        s.prefilled(3);
        let plan = s.schedule(&mut pool);
        assert_eq!((plan.prefill, plan.decode), (None, vec![1, 2, 3]));
    }

    #[test]
    fn queue_and_running_limits_hold() {
        let mut pool = KvPool::new(1000);
        let mut s = Scheduler::new(limits(2, 1));
        s.submit(1, need(10, 0), &pool).unwrap();
        s.submit(2, need(10, 0), &pool).unwrap();
        assert_eq!(s.submit(3, need(10, 0), &pool), Err(Refusal::QueueFull { max_queue: 2 }));
        assert_eq!(
            s.submit(4, need(900, 101), &pool),
            Err(Refusal::NeverFits { need: 1001, limit: 1000 })
        );
        assert_eq!(s.schedule(&mut pool).admitted, vec![1]);
        assert!(s.schedule(&mut pool).admitted.is_empty(), "one running at most");
        s.submit(3, need(10, 0), &pool).unwrap();
        s.remove(1);
        assert_eq!(s.schedule(&mut pool).admitted, vec![2]);
        assert_eq!(s.waiting(), 1);
    }
}
