//! Work done once across the fleet: a lease names the work, its holder does it, and every
//! other replica waits for the lease to be free and reads the result from the store (where
//! the holder wrote it). A holder that died or failed leaves nothing in the store: the
//! waiter then does the work itself (taking the lease over if it can). Without Redis (or
//! while it does not answer) every replica does its own work, as a lone replica does; within
//! one replica, callers are coalesced before they get here (`proxy::flight::Flights`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Claim, Cluster};

/// How a lease name is counted in metrics: the part before the first `:` (`manifest`,
/// `tag`, `token`, `upload`, `lifecycle`).
pub fn kind_of(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

impl Cluster {
    /// Runs `work` unless another replica holds the lease `name`, in which case waits for it
    /// to be free (at most about `cluster.lease_ttl`) and returns what `check` finds in the
    /// store; when `check` finds nothing (the holder died or failed), claims the lease again
    /// (once) and runs `work` after all.
    pub async fn once<T, E, C, CF, W, WF>(self: &Arc<Self>, name: &str, check: C, work: W) -> Result<T, E>
    where
        C: Fn() -> CF,
        CF: Future<Output = Result<Option<T>, E>>,
        W: FnOnce() -> WF,
        WF: Future<Output = Result<T, E>>,
    {
        let kind = kind_of(name);
        for _ in 0..2 {
            match self.claim(name).await {
                Claim::Alone => return work().await,
                Claim::Mine(lease) => {
                    let r = work().await;
                    lease.release().await;
                    return r;
                }
                Claim::Held(holder) => {
                    tracing::debug!(lease = name, holder = %holder.replica, "another replica does this; waiting for it");
                    let waiting = crate::metrics::cluster_waiting(kind);
                    let free = self.wait_free(name, self.wait_limit()).await;
                    drop(waiting);
                    if let Some(v) = check().await? {
                        crate::metrics::cluster_wait(kind, "served");
                        return Ok(v);
                    }
                    if !free {
                        // Still held after the wait, and nothing in the store yet: a slow
                        // holder. Do it here rather than keep the client waiting longer.
                        break;
                    }
                }
            }
        }
        crate::metrics::cluster_wait(kind, "own");
        work().await
    }

    /// How long a replica waits for another's lease before it acts on its own: a little over
    /// the lease's lifetime (a dead holder's lease has expired by then).
    pub fn wait_limit(&self) -> Duration {
        self.lease_ttl() + Duration::from_secs(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn alone_runs_the_work_once() {
        let c = Cluster::alone();
        let r: Result<u32, ()> = c.once("manifest:x", || async { Ok(Some(1)) }, || async { Ok(2) }).await;
        assert_eq!(r, Ok(2), "alone, the work runs (the store is not consulted first)");
        assert_eq!(kind_of("tag:docker.io/library/nginx:latest"), "tag");
        assert_eq!(kind_of("lifecycle"), "lifecycle");
    }
}
