//! A linearizability checker for one profile's points balance (after Wing & Gong, with Lowe's
//! memoization, as Porcupine does it).
//!
//! The history is what clients saw: each operation with the time it was invoked and the time
//! its answer came back. An earn whose answer never came (the client gave up) may have taken
//! effect at any time after its invocation, or never. The history is linearizable if some
//! order of the operations, each placed between its invocation and its answer, explains every
//! answer under the sequential model: earns add their points once, reads return the sum so
//! far.

use std::collections::HashSet;

/// One client operation on a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `points` earned by one event: `done` is when the client learned it applied, `None` if
    /// it never learned.
    Earn {
        points: u64,
        invoked: u64,
        done: Option<u64>,
    },
    /// A read that answered `balance`.
    Read {
        balance: u64,
        invoked: u64,
        done: u64,
    },
}

impl Op {
    fn invoked(&self) -> u64 {
        match self {
            Op::Earn { invoked, .. } | Op::Read { invoked, .. } => *invoked,
        }
    }

    fn done(&self) -> Option<u64> {
        match self {
            Op::Earn { done, .. } => *done,
            Op::Read { done, .. } => Some(*done),
        }
    }
}

/// Most operations of one profile the checker takes (its search keeps a bit per operation).
pub const OPS_MAX: usize = 128;

/// Whether `ops` is linearizable; if not, a description of the history.
pub fn linearizable(ops: &[Op]) -> Result<(), String> {
    assert!(
        ops.len() <= OPS_MAX,
        "{} operations for one profile",
        ops.len()
    );
    let mut seen = HashSet::new();
    if search(ops, 0, 0, &mut seen) {
        Ok(())
    } else {
        Err(format!("no linearization explains this history: {ops:#?}"))
    }
}

/// Depth-first: `placed` holds the operations already linearized (earns that never answered
/// may also be placed as having no effect), `balance` the model's state after them.
fn search(ops: &[Op], placed: u128, balance: u64, seen: &mut HashSet<(u128, u64)>) -> bool {
    // Done when every operation that answered is placed.
    if ops
        .iter()
        .enumerate()
        .all(|(i, op)| placed & (1 << i) != 0 || op.done().is_none())
    {
        return true;
    }
    if !seen.insert((placed, balance)) {
        return false;
    }
    // An operation may go next only if none still unplaced answered before it was invoked.
    let horizon = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| placed & (1 << i) == 0)
        .filter_map(|(_, op)| op.done())
        .min()
        .unwrap_or(u64::MAX);
    for (i, op) in ops.iter().enumerate() {
        if placed & (1 << i) != 0 || op.invoked() > horizon {
            continue;
        }
        let next = placed | (1 << i);
        let fits = match op {
            Op::Read { balance: read, .. } => *read == balance && search(ops, next, balance, seen),
            Op::Earn { points, done, .. } => {
                search(ops, next, balance + points, seen)
                    || (done.is_none() && search(ops, next, balance, seen))
            }
        };
        if fits {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn earn(points: u64, invoked: u64, done: Option<u64>) -> Op {
        Op::Earn {
            points,
            invoked,
            done,
        }
    }

    fn read(balance: u64, invoked: u64, done: u64) -> Op {
        Op::Read {
            balance,
            invoked,
            done,
        }
    }

    #[test]
    fn sequential_and_concurrent_histories_that_explain_themselves_pass() {
        assert!(linearizable(&[earn(1, 0, Some(1)), read(1, 2, 3)]).is_ok());
        // A read concurrent with an earn may see it or not.
        assert!(linearizable(&[earn(2, 0, Some(10)), read(0, 1, 2), read(2, 3, 4)]).is_ok());
        // An earn that never answered may count from any time, or never.
        assert!(linearizable(&[earn(4, 0, None), read(0, 5, 6)]).is_ok());
        assert!(linearizable(&[earn(4, 0, None), read(4, 5, 6)]).is_ok());
    }

    #[test]
    fn reads_that_go_back_in_time_or_miss_acknowledged_writes_fail() {
        // A read after an acknowledged earn must see it.
        assert!(linearizable(&[earn(1, 0, Some(1)), read(0, 2, 3)]).is_err());
        // Once a read saw an earn, a later read cannot un-see it.
        assert!(linearizable(&[earn(2, 0, None), read(2, 1, 2), read(0, 3, 4)]).is_err());
        // Nothing is counted twice.
        assert!(linearizable(&[earn(1, 0, Some(1)), read(2, 2, 3)]).is_err());
    }
}
