//! Single-flight for small results (manifests, tag revalidations): concurrent callers with one
//! key share one future; the entry is dropped as soon as it resolves.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use futures::future::{BoxFuture, FutureExt, Shared};

pub struct Flights<K, V: Clone> {
    map: Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>,
}

impl<K, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Flights { map: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + Send + Sync + 'static> Flights<K, V> {
    /// Runs `f` unless a call with `key` is already running, in which case its result is
    /// shared. `f` is spawned, so it completes even if every caller goes away.
    pub async fn run<F>(&self, key: K, f: F) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        let fut = {
            let mut map = self.map.lock().unwrap();
            map.entry(key.clone())
                .or_insert_with(|| {
                    let handle = tokio::spawn(f);
                    async move { handle.await.expect("single-flight task panicked") }.boxed().shared()
                })
                .clone()
        };
        let v = fut.clone().await;
        let mut map = self.map.lock().unwrap();
        if map.get(&key).is_some_and(|f| f.ptr_eq(&fut)) {
            map.remove(&key);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_calls_share_one_run() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::default();
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
}
