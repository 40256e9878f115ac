//! The replicas' internal endpoints under [`PEER_PREFIX`]
//! (`/_stevedore/cluster/…`), for other replicas of the fleet only: every request must carry
//! `Authorization: Bearer <cluster.secret>`, else 401. Never part of `/v2`.
//!
//! - `GET ping`: this replica's id (a peer checks it reached the replica it meant).
//! - `GET fill/<digest>?host=<upstream>&name=<repository>[&checked=1]`: the blob from this
//!   replica's running fill (growing; the last byte after the verification) or its store,
//!   `Range` honoured; `x-stevedore-peer` says which (`fill`, `stored`), or `error` (an
//!   answer for the client: the fill failed upstream, an unsatisfiable range), or `none`
//!   (404: neither; the asking replica looks elsewhere), or `other-repository` (404: its
//!   copy is another repository's; the asking replica checks that the upstream has the
//!   digest in the named repository and asks again with `checked=1`). The registry decides
//!   ([`crate::registry::Registry::peer_fill`]); this renders its answer.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::{blobs, headers, AppState};
use crate::error::{ApiError, Code};
use crate::registry::relay::{OTHER_REPOSITORY, PEER_PREFIX, PEER_SOURCE};
use crate::registry::PeerAnswer;

pub async fn dispatch(State(app): State<AppState>, req: Request) -> Response {
    if !app.registry.peer_authorized(req.headers()) {
        return ApiError::new(Code::Unauthorized)
            .detail("replica endpoints need the fleet's cluster.secret")
            .into_response();
    }
    let path = req.uri().path().strip_prefix(PEER_PREFIX).unwrap_or("");
    match (req.method().as_str(), path) {
        ("GET", "/ping") => {
            super::headers::json_response(serde_json::json!({ "replica": app.registry.replica_id() }).to_string())
                .into_response()
        }
        ("GET", p) if p.starts_with("/fill/") => match p["/fill/".len()..].parse::<crate::oci::Digest>() {
            Ok(d) => {
                let range = req.headers().get(axum::http::header::RANGE).and_then(|v| v.to_str().ok());
                peer_response(app.registry.peer_fill(&d, req.uri().query(), range).await)
            }
            Err(e) => ApiError::new(Code::DigestInvalid).detail(e.to_string()).into_response(),
        },
        _ => ApiError::new(Code::Unsupported)
            .status(axum::http::StatusCode::NOT_FOUND)
            .detail("no such replica endpoint")
            .into_response(),
    }
}

/// A relay request's answer, its [`PEER_SOURCE`] set.
fn peer_response(answer: PeerAnswer) -> Response {
    let (mut r, source) = match answer {
        PeerAnswer::None => {
            (ApiError::new(Code::BlobUnknown).detail("no fill of it on this replica").into_response(), "none")
        }
        PeerAnswer::OtherRepository => (
            ApiError::new(Code::BlobUnknown).detail("this replica has it through another repository").into_response(),
            OTHER_REPOSITORY,
        ),
        PeerAnswer::Blob(answer, source) => (blobs::blob_response(answer), source),
        PeerAnswer::Error(e) => (ApiError::from(e).into_response(), "error"),
    };
    headers::set(r.headers_mut(), PEER_SOURCE, source);
    r
}
