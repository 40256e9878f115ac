//! The error catalogue: every error a client can see is an [`ApiError`] carrying one of the
//! spec's codes, rendered once as `{"errors":[{"code","message","detail"}]}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// The distribution-spec error codes (plus `UNKNOWN`/`UNAVAILABLE` for server-side trouble).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    RangeInvalid,
    PaginationNumberInvalid,
    Unavailable,
    Unknown,
}

impl Code {
    /// `(wire code, default status, message)`.
    pub fn describe(self) -> (&'static str, StatusCode, &'static str) {
        use Code::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND, "blob unknown to registry"),
            BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST, "blob upload invalid"),
            BlobUploadUnknown => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND, "blob upload unknown to registry"),
            DigestInvalid => {
                ("DIGEST_INVALID", StatusCode::BAD_REQUEST, "provided digest did not match uploaded content")
            }
            ManifestBlobUnknown => (
                "MANIFEST_BLOB_UNKNOWN",
                StatusCode::BAD_REQUEST,
                "manifest references a manifest or blob unknown to registry",
            ),
            ManifestInvalid => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST, "manifest invalid"),
            ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND, "manifest unknown to registry"),
            NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST, "invalid repository name"),
            NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND, "repository name not known to registry"),
            SizeInvalid => ("SIZE_INVALID", StatusCode::BAD_REQUEST, "provided length did not match content length"),
            TagInvalid => ("TAG_INVALID", StatusCode::BAD_REQUEST, "manifest tag did not match URI"),
            Unauthorized => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED, "authentication required"),
            Denied => ("DENIED", StatusCode::FORBIDDEN, "requested access to the resource is denied"),
            Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED, "the operation is unsupported"),
            TooManyRequests => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS, "too many requests"),
            RangeInvalid => ("RANGE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE, "invalid content range"),
            PaginationNumberInvalid => {
                ("PAGINATION_NUMBER_INVALID", StatusCode::BAD_REQUEST, "invalid number of results requested")
            }
            Unavailable => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE, "service unavailable"),
            Unknown => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR, "unknown error"),
        }
    }

    pub fn with_detail(self, detail: impl Into<Value>) -> ApiError {
        ApiError::new(self).detail(detail)
    }
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub status: StatusCode,
    pub detail: Option<Value>,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(code: Code) -> ApiError {
        ApiError { code, status: code.describe().1, detail: None, headers: Vec::new() }
    }

    pub fn detail(mut self, detail: impl Into<Value>) -> ApiError {
        self.detail = Some(detail.into());
        self
    }

    pub fn status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    pub fn header(mut self, name: header::HeaderName, value: impl ToString) -> ApiError {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((name, v));
        }
        self
    }

    /// A server-side failure: logged in full, reported to the client without internals.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "internal error");
        ApiError::new(Code::Unknown)
    }
}

impl From<Code> for ApiError {
    fn from(c: Code) -> ApiError {
        ApiError::new(c)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, _, message) = self.code.describe();
        let body =
            json!({"errors": [{"code": code, "message": message, "detail": self.detail.unwrap_or(Value::Null)}]});
        let mut resp = (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;
