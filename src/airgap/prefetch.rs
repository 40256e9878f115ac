//! `stevedore prefetch [REF...]`: the registry's [`Registry::prefetch`], the call
//! `POST /admin/prefetch` makes too (one path for both).

use std::io::Write;

use crate::registry::Registry;
pub use crate::registry::{PrefetchOptions, PrefetchReport};

/// Prefetches every reference; progress lines go to `out`.
pub async fn prefetch(registry: &Registry, opts: &PrefetchOptions<'_>, out: &mut (dyn Write + Send)) -> PrefetchReport {
    registry.prefetch(opts, out).await
}
