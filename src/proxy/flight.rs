//! Single-flight for small results (manifests, tag revalidations): concurrent callers with one
//! key share one future. The spawned task removes its own entry the moment it resolves,
//! whether or not any caller is still waiting, so a result (an error included) is never
//! served to a later call; a task that panics resolves to the value of `on_panic`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

type Entry<V> = (u64, Shared<BoxFuture<'static, V>>);

pub struct Flights<K, V: Clone> {
    map: Arc<Mutex<HashMap<K, Entry<V>>>>,
    next: AtomicU64,
    on_panic: fn() -> V,
}

impl<K, V: Clone> Flights<K, V> {
    /// `on_panic` is what callers get when the shared task panics or is cancelled.
    pub fn new(on_panic: fn() -> V) -> Self {
        Flights { map: Arc::default(), next: AtomicU64::new(0), on_panic }
    }
}

impl<K: Hash + Eq + Clone + Send + 'static, V: Clone + Send + Sync + 'static> Flights<K, V> {
    /// Runs `f` unless a call with `key` is already running, in which case its result is
    /// shared. `f` is spawned, so it completes even if every caller goes away.
    pub async fn run<F>(&self, key: K, f: F) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        let fut = {
            let mut map = self.map.lock().unwrap();
            match map.get(&key) {
                Some((_, fut)) => fut.clone(),
                None => {
                    let id = self.next.fetch_add(1, Ordering::Relaxed);
                    let (map2, key2, on_panic) = (self.map.clone(), key.clone(), self.on_panic);
                    // In the first caller's span (its trace, `[tracing]`); none without tracing.
                    let f = tracing::Instrument::in_current_span(f);
                    let handle = tokio::spawn(async move {
                        let v = AssertUnwindSafe(f).catch_unwind().await.unwrap_or_else(|_| on_panic());
                        let mut map = map2.lock().unwrap();
                        if map.get(&key2).is_some_and(|(i, _)| *i == id) {
                            map.remove(&key2);
                        }
                        v
                    });
                    let fut = async move { handle.await.unwrap_or_else(|_| on_panic()) }.boxed().shared();
                    map.insert(key, (id, fut.clone()));
                    fut
                }
            }
        };
        fut.await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_calls_share_one_run() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::new(Flights::new(|| 0));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (flights, runs) = (flights.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run("k", async move {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // once resolved, the next call runs again
        let runs2 = runs.clone();
        assert_eq!(flights.run("k", async move { runs2.fetch_add(1, Ordering::SeqCst) + 1 }).await, 2);
    }

    #[tokio::test]
    async fn a_result_nobody_waits_for_is_not_kept() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::new(Flights::new(|| 0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let f2 = flights.clone();
        let caller = tokio::spawn(async move {
            f2.run("k", async move {
                let _ = rx.await;
                1
            })
            .await
        });
        // The only caller goes away while the task runs; the task then resolves.
        while flights.len() == 0 {
            tokio::task::yield_now().await;
        }
        caller.abort();
        let _ = caller.await;
        tx.send(()).unwrap();
        for _ in 0..1000 {
            if flights.len() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(flights.len(), 0, "a resolved result stays in the map");
        assert_eq!(flights.run("k", async { 2 }).await, 2, "a later call runs again");
    }

    #[tokio::test]
    async fn a_panicking_task_yields_the_fallback_and_frees_its_key() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::new(Flights::new(|| 99));
        let v = flights.run("k", async { panic!("boom") }).await;
        assert_eq!(v, 99);
        assert_eq!(flights.len(), 0);
        assert_eq!(flights.run("k", async { 3 }).await, 3);
    }
}
