//! Bytes held by ingests (upload sessions, fills in progress or abandoned), kept by the store
//! as they change: the cap counts them beside proxied content (they are not evictable), and
//! `stevedore_store_used_bytes{kind="ingest"}` shows them. O(1) per change, never a walk:
//! every writer across the seam ([`super::counted`]) reports the bytes it has accepted (at
//! each write, checkpoint and rollback; a resumed one its checkpoint's offset), and a commit,
//! an abort or a removal of the ingest takes its bytes off. The ingests a previous process
//! left are counted once, from their recorded offsets, by the first upload sweep
//! ([`super::Store::sweep_uploads`], which lists them anyway).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::ids::IngestId;

/// One ingest's counted bytes (shared by its writer and the table).
pub(crate) type Slot = Arc<AtomicU64>;

#[derive(Default)]
pub(crate) struct Inflight {
    total: AtomicU64,
    by_id: Mutex<HashMap<IngestId, Slot>>,
    /// The ingests found in the store were counted (once, at the first sweep).
    pub(crate) seeded: AtomicBool,
}

impl Inflight {
    /// Bytes of every ingest known.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// The slot of `id` (created, at 0, when it has none).
    pub(crate) fn slot(&self, id: IngestId) -> Slot {
        self.by_id.lock().unwrap().entry(id).or_default().clone()
    }

    /// Whether `id` is counted already.
    pub(crate) fn knows(&self, id: &IngestId) -> bool {
        self.by_id.lock().unwrap().contains_key(id)
    }

    /// `slot` holds `bytes` now.
    pub(crate) fn set(&self, slot: &AtomicU64, bytes: u64) {
        let old = slot.swap(bytes, Ordering::AcqRel);
        if bytes >= old {
            self.total.fetch_add(bytes - old, Ordering::AcqRel);
        } else {
            self.total.fetch_sub(old - bytes, Ordering::AcqRel);
        }
    }

    /// The ingest is gone (committed, aborted, removed): its bytes are off the count.
    pub(crate) fn forget(&self, id: &IngestId) {
        let slot = self.by_id.lock().unwrap().remove(id);
        if let Some(slot) = slot {
            self.set(&slot, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_writes_and_forgets() {
        let f = Inflight::default();
        let (a, b) = (super::super::backend::new_ingest_id(), super::super::backend::new_ingest_id());
        let sa = f.slot(a);
        f.set(&sa, 100);
        let sb = f.slot(b);
        f.set(&sb, 50);
        assert_eq!(f.total(), 150);
        f.set(&sa, 40);
        assert_eq!(f.total(), 90);
        f.forget(&a);
        assert_eq!(f.total(), 50);
        f.forget(&a);
        assert_eq!(f.total(), 50);
        assert!(f.knows(&b) && !f.knows(&a));
        f.forget(&b);
        assert_eq!(f.total(), 0);
    }
}
