//! The ids of the store's ingests and upload sessions: a leaf both the layout (which names
//! their keys) and the backend seam (which creates and resumes them) use.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// An upload session's (and any ingest's) id: a UUID (v7, so sessions sort by age).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct UploadId(Uuid);

impl UploadId {
    pub fn from_uuid(u: Uuid) -> UploadId {
        UploadId(u)
    }
}

impl FromStr for UploadId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<UploadId, uuid::Error> {
        // Only the canonical hyphenated form, so one session has one URL.
        let u = Uuid::try_parse(s)?;
        if u.hyphenated().to_string() != s {
            return Err(Uuid::try_parse("!").unwrap_err());
        }
        Ok(UploadId(u))
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// An ingest's id: a UUID v7 (ingests sort by age). Upload sessions use it as their id.
pub type IngestId = UploadId;
