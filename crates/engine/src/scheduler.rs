//! The scheduler: which sequences wait, which are admitted, and what each step runs.
//!
//! Pure bookkeeping over sequence ids and byte counts, testable without a model. Each step
//! admits waiting sequences in arrival order while their reservation fits the pool (the
//! first that does not fit blocks the ones behind it, so a large request is not starved),
//! gives one prefill chunk to the oldest admitted sequence still prefilling, and decodes
//! every sequence past its prefill together.

use std::collections::VecDeque;

use crate::pool::KvPool;
use crate::sequence::SeqId;

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
    /// `(id, bytes to reserve)` in arrival order.
    waiting: VecDeque<(SeqId, usize)>,
    prefilling: VecDeque<SeqId>,
    decoding: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits) -> Self {
        Self { limits, waiting: VecDeque::new(), prefilling: VecDeque::new(), decoding: Vec::new() }
    }

    /// Queues a sequence that will need `need` bytes, or says why not.
    pub fn submit(&mut self, id: SeqId, need: usize, pool: &KvPool) -> Result<(), Refusal> {
        if !pool.can_ever_fit(need) {
            return Err(Refusal::NeverFits { need, limit: pool.limit() });
        }
        if self.waiting.len() >= self.limits.max_queue {
            return Err(Refusal::QueueFull { max_queue: self.limits.max_queue });
        }
        self.waiting.push_back((id, need));
        Ok(())
    }

    /// Admits what fits and says what runs this step.
    pub fn schedule(&mut self, pool: &mut KvPool) -> Plan {
        let mut admitted = Vec::new();
        while let Some(&(id, need)) = self.waiting.front() {
            if self.running() >= self.limits.max_running || !pool.try_reserve(id, need) {
                break;
            }
            self.waiting.pop_front();
            self.prefilling.push_back(id);
            admitted.push(id);
        }
        Plan { admitted, prefill: self.prefilling.front().copied(), decode: self.decoding.clone() }
    }

    /// `id` finished its prefill: it decodes from the next step on.
    pub fn prefilled(&mut self, id: SeqId) {
        if let Some(at) = self.prefilling.iter().position(|&p| p == id) {
            self.prefilling.remove(at);
            self.decoding.push(id);
        }
    }

    /// Forgets `id` wherever it is (finished or cancelled); the caller frees its memory.
    pub fn remove(&mut self, id: SeqId) {
        self.waiting.retain(|&(w, _)| w != id);
        self.prefilling.retain(|&p| p != id);
        self.decoding.retain(|&d| d != id);
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

    #[test]
    fn admits_in_order_while_the_pool_has_room() {
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        for (id, need) in [(1, 40), (2, 40), (3, 40)] {
            s.submit(id, need, &pool).unwrap();
        }
        let plan = s.schedule(&mut pool);
        assert_eq!(plan.admitted, vec![1, 2]);
        assert_eq!(plan.prefill, Some(1));
        assert!(plan.decode.is_empty());
        assert_eq!((s.waiting(), s.running(), pool.used()), (1, 2, 80));
    }

    #[test]
    fn a_request_that_does_not_fit_blocks_later_ones() {
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        s.submit(1, 70, &pool).unwrap();
        s.submit(2, 50, &pool).unwrap();
        s.submit(3, 10, &pool).unwrap();
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
            s.submit(id, 10, &pool).unwrap();
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
    fn settling_after_compression_admits_more() {
        let mut pool = KvPool::new(100);
        let mut s = Scheduler::new(limits(8, 8));
        for id in 1..=4 {
            s.submit(id, 60, &pool).unwrap();
        }
        assert_eq!(s.schedule(&mut pool).admitted, vec![1]);
        s.prefilled(1);
        pool.settle(1, 20);
        assert_eq!(s.schedule(&mut pool).admitted, vec![2]);
        s.prefilled(2);
        pool.settle(2, 20);
        assert_eq!(s.schedule(&mut pool).admitted, vec![3]);
        assert_eq!(pool.used(), 100);
        assert!(pool.peak() <= pool.limit());
    }

    #[test]
    fn queue_and_running_limits_hold() {
        let mut pool = KvPool::new(1000);
        let mut s = Scheduler::new(limits(2, 1));
        s.submit(1, 10, &pool).unwrap();
        s.submit(2, 10, &pool).unwrap();
        assert_eq!(s.submit(3, 10, &pool), Err(Refusal::QueueFull { max_queue: 2 }));
        assert_eq!(s.submit(4, 2000, &pool), Err(Refusal::NeverFits { need: 2000, limit: 1000 }));
        assert_eq!(s.schedule(&mut pool).admitted, vec![1]);
        assert!(s.schedule(&mut pool).admitted.is_empty(), "one running at most");
        s.submit(3, 10, &pool).unwrap();
        s.remove(1);
        assert_eq!(s.schedule(&mut pool).admitted, vec![2]);
        assert_eq!(s.waiting(), 1);
    }
}
