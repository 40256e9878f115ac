//! The replicas' internal endpoints under [`crate::cluster::PEER_PREFIX`]
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
//!   digest in the named repository and asks again with `checked=1`). See
//!   `api::blobs::serve_peer`.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::{ApiError, Code};

pub async fn dispatch(State(app): State<AppState>, req: Request) -> Response {
    if !app.cluster.peer_authorized(req.headers()) {
        return ApiError::new(Code::Unauthorized)
            .detail("replica endpoints need the fleet's cluster.secret")
            .into_response();
    }
    let path = req.uri().path().strip_prefix(crate::cluster::PEER_PREFIX).unwrap_or("");
    match (req.method().as_str(), path) {
        ("GET", "/ping") => {
            super::headers::json_response(serde_json::json!({ "replica": app.cluster.id() }).to_string())
                .into_response()
        }
        ("GET", p) if p.starts_with("/fill/") => match p["/fill/".len()..].parse::<crate::oci::Digest>() {
            Ok(d) => {
                let ask = super::blobs::PeerAsk::from_query(req.uri().query());
                super::blobs::serve_peer(&app, &d, ask, req.headers()).await
            }
            Err(e) => ApiError::new(Code::DigestInvalid).detail(e.to_string()).into_response(),
        },
        _ => ApiError::new(Code::Unsupported)
            .status(axum::http::StatusCode::NOT_FOUND)
            .detail("no such replica endpoint")
            .into_response(),
    }
}
