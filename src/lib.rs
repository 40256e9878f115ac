//! Stevedore: a pull-through caching OCI registry. See ARCHITECTURE.md for the map.

pub mod airgap;
pub mod api;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod error;
pub mod hooks;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod oci;
pub mod progress;
pub mod proxy;
pub mod registry;
pub mod server;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod upstream;
