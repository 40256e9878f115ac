//! Shared helpers for the client, crash and memory tests (not a test target itself).
#![allow(dead_code)]

pub mod data;
pub mod http;
pub mod oci_layout;
pub mod skopeo_cli;
pub mod store;
