//! What a request needs of `auth`, in its terms: the repository's full name as the rules
//! match it, and the action a route and method are.

use axum::http::Method;

use super::routes::Route;
use crate::auth::Need;
use crate::config::Action;
use crate::registry::Target;

/// The repository's full name, as rules match it: a local repository's name, or
/// `<upstream host>/<name at the upstream>`, whichever dialect the client used.
pub fn full_name(t: &Target) -> String {
    match t {
        Target::Local(n) => n.to_string(),
        Target::Proxy { repo, .. } => format!("{}/{}", repo.upstream.host, repo.remote),
    }
}

/// What a route and method need: GET and HEAD pull, except an upload's status (push, as in
/// Distribution: an upload session is a push in progress); DELETE of a manifest or blob
/// deletes; everything else on a repository (uploads, manifest PUT, cancelling an upload)
/// pushes.
pub fn need(route: &Route, method: &Method, target: Option<&Target>) -> Need {
    let (Some(name), Some(t)) = (route.name(), target) else {
        return if matches!(route, Route::Catalog) { Need::Catalog } else { Need::Base };
    };
    let action = match (route, method) {
        (Route::Upload(..) | Route::UploadStart(..), _) => Action::Push,
        (_, &Method::GET | &Method::HEAD) => Action::Pull,
        (Route::Manifest(..) | Route::ManifestBadTag(..) | Route::Blob(..), &Method::DELETE) => Action::Delete,
        _ => Action::Push,
    };
    Need::Repo { asked: name.to_string(), full: full_name(t), action }
}
