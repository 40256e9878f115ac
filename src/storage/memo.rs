//! A bounded in-memory map for the store's descriptor caches (digest → size, (repository,
//! digest) → linked): what a general-purpose cache costs per entry (moka: five heap blocks,
//! the key twice, ~0.5 KiB) is what an idle mirror holding N blobs keeps resident, so this
//! one is a few vectors: per shard, an insertion-ordered map (key, value, a stamp and a
//! referenced bit inline; ~70 B an entry for a digest key) evicted by CLOCK (second chance,
//! an approximation of LRU) once full. A lookup or an insert takes one shard's lock, touches
//! no other memory and never allocates but to grow the shard.
//!
//! With a time to live (replicas sharing the store), an entry older than it is a miss and is
//! dropped when looked up or when the clock hand passes it; nothing runs while idle.

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indexmap::IndexMap;

const SHARDS: usize = 16;

pub struct Memo<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: RandomState,
    /// Entries per shard at most.
    per_shard: usize,
    ttl: Option<Duration>,
    epoch: Instant,
}

struct Shard<K, V> {
    map: IndexMap<K, Slot<V>>,
    /// The clock hand: the next slot eviction looks at.
    hand: usize,
}

struct Slot<V> {
    value: V,
    /// Inserted at, in seconds since the memo's epoch.
    at: u32,
    referenced: bool,
}

impl<K: Hash + Eq, V: Clone> Memo<K, V> {
    /// At most `capacity` entries (at least one per shard), each kept at most `ttl`.
    pub fn new(capacity: u64, ttl: Option<Duration>) -> Memo<K, V> {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let shards = SHARDS.min(capacity);
        Memo {
            shards: (0..shards).map(|_| Mutex::new(Shard { map: IndexMap::new(), hand: 0 })).collect(),
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(shards),
            ttl,
            epoch: Instant::now(),
        }
    }

    fn shard(&self, k: &K) -> std::sync::MutexGuard<'_, Shard<K, V>> {
        let i = (self.hasher.hash_one(k) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn expired(&self, at: u32, now: u32) -> bool {
        self.ttl.is_some_and(|ttl| u64::from(now.saturating_sub(at)) >= ttl.as_secs().max(1))
    }

    pub fn get(&self, k: &K) -> Option<V> {
        let now = self.now();
        let mut s = self.shard(k);
        let i = s.map.get_index_of(k)?;
        let (_, slot) = s.map.get_index_mut(i).expect("index just found");
        if self.expired(slot.at, now) {
            s.remove_at(i);
            return None;
        }
        slot.referenced = true;
        Some(slot.value.clone())
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    pub fn insert(&self, k: K, value: V) {
        let now = self.now();
        let mut s = self.shard(&k);
        if let Some(slot) = s.map.get_mut(&k) {
            *slot = Slot { value, at: now, referenced: true };
            return;
        }
        if s.map.len() >= self.per_shard {
            s.evict_one(|at| self.expired(at, now));
        }
        s.map.insert(k, Slot { value, at: now, referenced: false });
    }

    pub fn invalidate(&self, k: &K) {
        let mut s = self.shard(k);
        if let Some(i) = s.map.get_index_of(k) {
            s.remove_at(i);
        }
    }

    pub fn invalidate_all(&self) {
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            s.map = IndexMap::new();
            s.hand = 0;
        }
    }

    /// Entries held (expired ones not dropped yet included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len()).sum()
    }
}

impl<K: Hash + Eq, V> Shard<K, V> {
    fn remove_at(&mut self, i: usize) {
        // The last slot moves into `i`: the hand stays where it is and looks at it next.
        self.map.swap_remove_index(i);
        if self.hand >= self.map.len() {
            self.hand = 0;
        }
    }

    /// Drops one entry: the first expired or unreferenced one from the hand on, clearing the
    /// referenced bits it passes (at most two turns).
    fn evict_one(&mut self, expired: impl Fn(u32) -> bool) {
        let n = self.map.len();
        for _ in 0..2 * n + 1 {
            if self.hand >= self.map.len() {
                self.hand = 0;
            }
            let (_, slot) = self.map.get_index_mut(self.hand).expect("hand within the map");
            if slot.referenced && !expired(slot.at) {
                slot.referenced = false;
                self.hand += 1;
                continue;
            }
            let i = self.hand;
            self.remove_at(i);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded() {
        let m: Memo<u32, u32> = Memo::new(1024, None);
        for k in 0..16 {
            m.insert(k, k * 10);
        }
        assert_eq!(m.len(), 16);
        assert_eq!(m.get(&3), Some(30));
        // 16 shards of one entry: the bound holds whatever the keys' spread.
        let m: Memo<u32, u32> = Memo::new(16, None);
        for k in 100..1100 {
            m.insert(k, k);
            assert!(m.len() <= 16);
        }
        assert_eq!(m.get(&1099), Some(1099));
        m.invalidate(&1099);
        assert_eq!(m.get(&1099), None);
        m.invalidate_all();
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn a_referenced_entry_outlives_a_cold_one() {
        // One shard of four: the entry looked up survives the next eviction, a cold one goes.
        let m: Memo<u32, ()> = Memo::new(4, None);
        assert_eq!(m.shards.len(), 4);
        let m: Memo<u32, ()> =
            Memo { shards: vec![Mutex::new(Shard { map: IndexMap::new(), hand: 0 })].into(), per_shard: 4, ..m };
        for k in 0..4 {
            m.insert(k, ());
        }
        assert!(m.contains_key(&0));
        m.insert(4, ());
        assert!(m.contains_key(&0), "the referenced entry was evicted");
        assert!(!m.contains_key(&1), "the cold entry was kept");
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn expired_entries_are_misses() {
        let m: Memo<u32, u32> = Memo::new(8, Some(Duration::from_secs(30)));
        m.insert(1, 1);
        assert_eq!(m.get(&1), Some(1));
        let m = Memo { epoch: Instant::now() - Duration::from_secs(31), ..m };
        // Inserted at second 0 of the old epoch, now 31 s later.
        assert_eq!(m.get(&1), None);
        assert_eq!(m.len(), 0);
    }
}
