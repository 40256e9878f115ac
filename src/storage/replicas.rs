//! The replica registry: every serving replica writes its heartbeat under `meta/replicas/`,
//! so replicas (and operators) can see who else serves this store.

use std::time::SystemTime;

use bytes::Bytes;

use super::{layout, Store, StoreResult};

impl Store {
    /// Writes (or refreshes) a replica's heartbeat.
    pub async fn put_replica(&self, id: &uuid::Uuid, record: &[u8]) -> StoreResult<()> {
        super::counted::heartbeat(self.backend.put(&layout::replica(id), record)).await
    }

    /// Removes a replica's heartbeat (at shutdown, or a dead one's).
    pub async fn remove_replica(&self, id: &uuid::Uuid) -> StoreResult<bool> {
        super::counted::heartbeat(self.backend.remove(&layout::replica(id))).await
    }

    /// One replica's heartbeat: record, when it was written.
    pub async fn replica(&self, id: &uuid::Uuid) -> StoreResult<Option<(Bytes, SystemTime)>> {
        super::counted::heartbeat(self.backend.get(&layout::replica(id))).await
    }

    /// Every replica heartbeat but `except`'s (a replica's own is not read back): id, record,
    /// when it was written.
    pub async fn replicas(&self, except: Option<&uuid::Uuid>) -> StoreResult<Vec<(uuid::Uuid, Bytes, SystemTime)>> {
        super::counted::heartbeat(async {
            let mut out = Vec::new();
            for name in self.backend.list(&layout::replicas_dir()).await? {
                let Ok(id) = name.parse::<uuid::Uuid>() else { continue };
                if Some(&id) == except {
                    continue;
                }
                if let Some((raw, at)) = self.backend.get(&layout::replica(&id)).await? {
                    out.push((id, raw, at));
                }
            }
            Ok(out)
        })
        .await
    }
}
