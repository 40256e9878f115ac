//! The mutation protocol's guards (ARCHITECTURE.md, "The mutation protocol"): per-digest
//! reader-writer guards, striped (a digest maps to one of [`STRIPES`] tokio `RwLock`s).
//!
//! - Everything that makes content or a reference to it reachable (a commit, a link, a mount,
//!   a manifest PUT with its checks, a tag move) holds the SHARED guard of every digest
//!   involved ([`Guards::reach`]) from its existence check to its last write, then records a
//!   use of each digest before letting go.
//! - Everything that removes (eviction, GC) decides from a scan, then takes the EXCLUSIVE
//!   guard of the digests ([`Guards::try_remove`]), re-checks (not in use, no use recorded
//!   since the scan) and only then deletes.
//!
//! Guards are taken in sorted, de-duplicated stripe order (no deadlock) and never nested: a
//! helper that runs under a guard takes the [`Reach`] as proof instead of taking it again
//! (tokio's `RwLock` is write-preferring: a task asking again for a read guard it holds
//! while a writer waits would wait forever).
//!
//! A removal never waits: when a guard is held it gives up ([`Guards::try_remove`] → `None`)
//! and the content is left for the next pass, so eviction and GC never hold a stripe while
//! waiting for another, and never queue ahead of a push (which would block every new reader
//! of the stripe behind them). A reach waits only for a removal in progress on the same
//! stripe: a few small deletes.
//!
//! These guards are per process. Across replicas (`[redis]`) the store adds a fleet lease per
//! digest on top (`Store::try_removal`, `Store::reach`, ARCHITECTURE.md "Across replicas"): a
//! removal holds `remove:<digest>` through its re-check and delete; a reach writes a durable
//! access record, then waits while the lease is held.

use std::sync::Arc;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::Lease;
use crate::oci::Digest;

/// How many locks the digests share.
pub const STRIPES: usize = 1024;

pub struct Guards {
    stripes: Vec<Arc<RwLock<()>>>,
}

impl Default for Guards {
    fn default() -> Guards {
        Guards { stripes: (0..STRIPES).map(|_| Arc::new(RwLock::new(()))).collect() }
    }
}

/// Shared guards on some digests: none of them is removed while this is held.
pub struct Reach {
    stripes: Vec<usize>,
    _held: Vec<OwnedRwLockReadGuard<()>>,
    /// Digests given a durable access record after the guards were taken (a store shared by
    /// replicas records every digest of a reach before it checks their removal leases).
    recorded: Vec<Digest>,
}

impl Reach {
    /// Whether this covers `d` (a helper's check of its proof).
    pub fn covers(&self, d: &Digest) -> bool {
        self.stripes.binary_search(&stripe(d)).is_ok()
    }

    /// Whether `d` got its durable access record under this reach (no need to write another).
    pub fn recorded(&self, d: &Digest) -> bool {
        self.recorded.contains(d)
    }

    pub(crate) fn set_recorded(&mut self, ds: &[&Digest]) {
        self.recorded = ds.iter().map(|d| (*d).clone()).collect();
    }

    /// `d` got its durable access record under this reach.
    pub(crate) fn mark_recorded(&mut self, d: &Digest) {
        if !self.recorded.contains(d) {
            self.recorded.push(d.clone());
        }
    }
}

/// Exclusive guards on some digests: nothing makes them reachable while this is held. In a
/// fleet, also the removal leases of the digests (`remove:<digest>`, released when this is
/// dropped): nothing makes them reachable on another replica meanwhile.
pub struct Removal {
    stripes: Vec<usize>,
    _held: Vec<OwnedRwLockWriteGuard<()>>,
    pub(crate) leases: Vec<Lease>,
}

impl Removal {
    pub fn covers(&self, d: &Digest) -> bool {
        self.stripes.binary_search(&stripe(d)).is_ok()
    }

    /// Whether a removal lease was found expired at a renewal (another replica may be making
    /// the content reachable): the removal must not go on.
    pub fn lost(&self) -> bool {
        self.leases.iter().any(Lease::lost)
    }
}

/// The stripe of a digest (FNV-1a of its raw bytes: the digest is a hash already, any mix will do).
fn stripe(d: &Digest) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in d.raw() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % STRIPES as u64) as usize
}

fn stripes_of(ds: &[&Digest]) -> Vec<usize> {
    let mut s: Vec<usize> = ds.iter().map(|d| stripe(d)).collect();
    s.sort_unstable();
    s.dedup();
    s
}

impl Guards {
    /// The shared guards of `ds`, waiting for a removal in progress on any of them.
    pub async fn reach(&self, ds: &[&Digest]) -> Reach {
        let stripes = stripes_of(ds);
        let mut held = Vec::with_capacity(stripes.len());
        for &i in &stripes {
            let lock = self.stripes[i].clone();
            let g = match lock.clone().try_read_owned() {
                Ok(g) => g,
                Err(_) => {
                    crate::hooks::pause("guard.wait").await;
                    lock.read_owned().await
                }
            };
            held.push(g);
        }
        Reach { stripes, _held: held, recorded: Vec::new() }
    }

    /// The exclusive guards of `ds`, or `None` at once when any of them is held (something is
    /// being made reachable, or removed by another pass): the caller leaves them for later.
    pub async fn try_remove(&self, ds: &[&Digest]) -> Option<Removal> {
        let stripes = stripes_of(ds);
        let mut held = Vec::with_capacity(stripes.len());
        for &i in &stripes {
            match self.stripes[i].clone().try_write_owned() {
                Ok(g) => held.push(g),
                Err(_) => {
                    drop(held);
                    crate::hooks::pause("guard.wait").await;
                    return None;
                }
            }
        }
        Some(Removal { stripes, _held: held, leases: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn d(n: u32) -> Digest {
        Digest::of(Algorithm::Sha256, &n.to_le_bytes())
    }

    #[tokio::test]
    async fn a_removal_waits_for_nobody_and_a_reach_waits_for_a_removal() {
        let g = Arc::new(Guards::default());
        let (a, b) = (d(1), d(2));
        let reach = g.reach(&[&a, &b, &a]).await;
        assert!(reach.covers(&a) && reach.covers(&b));
        assert!(g.try_remove(&[&a]).await.is_none(), "removed under a reach");
        // Shared guards share.
        let again = g.reach(&[&b]).await;
        drop((reach, again));
        let removal = g.try_remove(&[&a, &b]).await.expect("free guards");
        assert!(removal.covers(&b));
        let waiting = tokio::spawn({
            let (g, a) = (g.clone(), a.clone());
            async move { g.reach(&[&a]).await.covers(&a) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a reach went through a removal");
        drop(removal);
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn digests_spread_over_the_stripes() {
        let used: std::collections::HashSet<usize> = (0..4096).map(|n| stripe(&d(n))).collect();
        assert!(used.len() > STRIPES * 9 / 10, "{} stripes used by 4096 digests", used.len());
    }
}
