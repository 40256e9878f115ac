//! Access rules: what a caller may do to a repository, by its full name (`team/app` for a
//! local repository, `docker.io/library/nginx` for an upstream's, however the client named
//! it). The one place a grant is decided: the API and the token endpoint both ask here.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{AccessRule, Action, AnonymousAccess, AuthConfig};
use crate::oci::glob;

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    Anonymous,
    User(String),
}

impl Who {
    pub fn name(&self) -> &str {
        match self {
            Who::Anonymous => "",
            Who::User(u) => u,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Who::Anonymous)
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Anonymous => f.write_str("an anonymous client"),
            Who::User(u) => write!(f, "user {u:?}"),
        }
    }
}

pub struct Rules {
    anonymous: AnonymousAccess,
    rules: Vec<AccessRule>,
    /// user → the groups it is in.
    groups: BTreeMap<String, BTreeSet<String>>,
}

/// Every user may do these where no rules are configured.
const DEFAULT_USER_ACTIONS: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

impl Rules {
    pub fn new(cfg: &AuthConfig) -> Rules {
        let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (g, members) in &cfg.groups {
            for m in members {
                groups.entry(m.clone()).or_default().insert(g.clone());
            }
        }
        Rules { anonymous: cfg.anonymous, rules: cfg.rules.clone(), groups }
    }

    /// Whether `who` may do `action` on the repository named `full`.
    pub fn allows(&self, who: &Who, full: &str, action: Action) -> bool {
        if action == Action::Pull && self.anonymous == AnonymousAccess::Pull {
            return true;
        }
        let Who::User(user) = who else { return false };
        if self.rules.is_empty() {
            return DEFAULT_USER_ACTIONS.contains(&action);
        }
        self.rules.iter().any(|r| {
            r.actions.contains(&action) && self.names(r, user) && r.repositories.iter().any(|p| glob::matches(p, full))
        })
    }

    /// Whether `who` is an administrator of the whole registry: granted `admin` on `*`.
    pub fn is_admin(&self, who: &Who) -> bool {
        let Who::User(user) = who else { return false };
        self.rules.iter().any(|r| {
            r.actions.contains(&Action::Admin) && r.repositories.iter().any(|p| p == "*") && self.names(r, user)
        })
    }

    /// Whether rule `r` applies to `user`.
    fn names(&self, r: &AccessRule, user: &str) -> bool {
        r.users.iter().any(|u| u == "*" || u == user)
            || self.groups.get(user).is_some_and(|gs| r.groups.iter().any(|g| gs.contains(g)))
    }

    /// The start-up summary: who may do what, one line each.
    pub fn describe(&self) -> Vec<String> {
        let mut out = vec![match self.anonymous {
            AnonymousAccess::Pull => "anonymous clients may pull every repository (auth.anonymous = \"pull\")".into(),
            AnonymousAccess::None => "anonymous clients may do nothing; every request needs a login".to_string(),
        }];
        if self.rules.is_empty() {
            out.push("no access rules: every user may pull, push and delete (where names are local)".into());
        }
        for r in &self.rules {
            let mut who: Vec<String> =
                r.users.iter().map(|u| if u == "*" { "every user".to_string() } else { u.clone() }).collect();
            who.extend(r.groups.iter().map(|g| format!("group {g}")));
            let actions: Vec<&str> = r.actions.iter().map(|a| a.as_str()).collect();
            out.push(format!("{} may {} on {}", who.join(", "), actions.join(", "), r.repositories.join(", ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> Rules {
        let cfg: crate::config::Config = toml::from_str(&format!("[auth]\nhtpasswd = \"/x\"\n{toml}")).unwrap();
        Rules::new(&cfg.auth)
    }

    fn user(u: &str) -> Who {
        Who::User(u.into())
    }

    #[test]
    fn without_rules_users_pull_push_delete_and_anonymous_pulls() {
        let r = rules("");
        for a in DEFAULT_USER_ACTIONS {
            assert!(r.allows(&user("alice"), "any/name", a), "{a:?}");
        }
        assert!(!r.allows(&user("alice"), "any/name", Action::Admin));
        assert!(r.allows(&Who::Anonymous, "any/name", Action::Pull));
        assert!(!r.allows(&Who::Anonymous, "any/name", Action::Push));
        let r = rules("anonymous = \"none\"");
        assert!(!r.allows(&Who::Anonymous, "any/name", Action::Pull));
        assert!(r.allows(&user("alice"), "any/name", Action::Pull));
    }

    #[test]
    fn rules_grant_per_pattern_user_and_group() {
        let r = rules(
            r#"
            anonymous = "none"
            [auth.groups]
            ci = ["bot"]
            [[auth.rules]]
            repositories = ["team/*"]
            users = ["alice"]
            groups = ["ci"]
            actions = ["pull", "push"]
            [[auth.rules]]
            repositories = ["docker.io/*", "team/*"]
            users = ["*"]
            actions = ["pull"]
            [[auth.rules]]
            repositories = ["*"]
            users = ["root"]
            actions = ["pull", "push", "delete", "admin"]
            "#,
        );
        assert!(r.allows(&user("alice"), "team/app", Action::Push));
        assert!(r.allows(&user("bot"), "team/a/b", Action::Push));
        assert!(!r.allows(&user("alice"), "team/app", Action::Delete));
        assert!(!r.allows(&user("alice"), "other/app", Action::Pull));
        assert!(r.allows(&user("carol"), "docker.io/library/nginx", Action::Pull));
        assert!(!r.allows(&user("carol"), "team/app", Action::Push));
        assert!(!r.allows(&Who::Anonymous, "team/app", Action::Pull));
        assert!(r.allows(&user("root"), "x", Action::Delete));
        assert!(r.is_admin(&user("root")) && !r.is_admin(&user("alice")) && !r.is_admin(&Who::Anonymous));
        // Anonymous pull on: a user always has at least what anonymous clients have.
        let r = rules(
            "anonymous = \"pull\"\n[[auth.rules]]\nrepositories = [\"team/*\"]\nusers = [\"alice\"]\nactions = [\"push\"]",
        );
        assert!(r.allows(&user("bob"), "other", Action::Pull));
        assert!(!r.allows(&user("bob"), "team/x", Action::Push));
        assert!(r.allows(&user("alice"), "team/x", Action::Push));
        assert!(r.describe().iter().any(|l| l.contains("alice may push on team/*")), "{:?}", r.describe());
    }
}
