//! `GET /token` and `POST /token` (the OAuth2 form containerd uses): HTTP around
//! [`crate::auth::issue`], which decides what the token grants.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};

use super::access::full_name;
use super::AppState;
use crate::error::{ApiError, Code};

/// The largest token request form accepted.
const TOKEN_FORM_LIMIT: usize = 64 << 10;

/// `GET /token` and `POST /token`: a signed token for the scopes the caller may have.
pub async fn token_endpoint(State(app): State<AppState>, req: Request) -> Response {
    let Some(auth) = app.auth.clone() else {
        return ApiError::new(Code::NameUnknown).detail("authentication is not configured").into_response();
    };
    let (parts, body) = req.into_parts();
    let form = if parts.method == Method::POST {
        match axum::body::to_bytes(body, TOKEN_FORM_LIMIT).await {
            Ok(b) => Some(b),
            Err(_) => {
                return ApiError::new(Code::SizeInvalid).detail("the token request form is too large").into_response()
            }
        }
    } else {
        None
    };
    let registry = &app.registry;
    crate::auth::issue(&auth, &parts, form.as_deref(), &|n| full_name(&registry.resolve(n, None)))
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
