//! Who may read the controller's HTTP API and act through it (issue 21, finding 4).
//!
//! `--http-auth none` (the default) serves `/api/*` to whoever reaches the listener, which is
//! why a non-loopback `--http` then needs `--http-unauthenticated`. With `tokens` or
//! `kubernetes` every `/api/*` request carries `Authorization: Bearer <token>`:
//!
//! * `tokens`: a file of `ROLE NAME TOKEN` lines (`viewer` reads, `admin` also quarantines and
//!   releases), re-read when it changes, compared in constant time;
//! * `kubernetes`: the token is reviewed by the API server (`TokenReview`) and each request
//!   authorized by it (`SubjectAccessReview`): reading needs `get` on `flows.bulkhead.dev`
//!   (a virtual resource, cluster-wide), quarantining `create` and releasing `delete` on
//!   `quarantines.bulkhead.dev` in the pod's namespace — the same verbs `kubectl` needs on the
//!   Quarantine objects the API writes.
//!
//! No token or an unknown one: 401 with `WWW-Authenticate: Bearer`. A known one without the
//! permission: 403. The page and its assets hold no data and need no token.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::kubernetes::review::{ResourceAccess, ReviewError, Reviewed, Reviewer};
use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;

use super::api::ApiError;

/// `--http-auth`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpAuthMode {
    /// No authentication: loopback only, unless --http-unauthenticated.
    #[default]
    None,
    /// Bearer tokens listed in --http-tokens.
    Tokens,
    /// Bearer tokens reviewed by the Kubernetes API server, requests authorized by its RBAC.
    Kubernetes,
}

impl HttpAuthMode {
    pub const ALL: [HttpAuthMode; 3] = [
        HttpAuthMode::None,
        HttpAuthMode::Tokens,
        HttpAuthMode::Kubernetes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpAuthMode::None => "none",
            HttpAuthMode::Tokens => "tokens",
            HttpAuthMode::Kubernetes => "kubernetes",
        }
    }
}

impl std::fmt::Display for HttpAuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HttpAuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<HttpAuthMode, String> {
        HttpAuthMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("{s:?} is none of none, tokens, kubernetes"))
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Read the map, flows, policies, quarantines.
    Read,
    /// Quarantine a pod of this namespace.
    Quarantine(String),
    /// Release a pod of this namespace.
    Release(String),
}

impl Want {
    fn access(&self) -> ResourceAccess {
        let (verb, resource, namespace) = match self {
            Want::Read => ("get", "flows", None),
            Want::Quarantine(ns) => ("create", "quarantines", Some(ns.clone())),
            Want::Release(ns) => ("delete", "quarantines", Some(ns.clone())),
        };
        ResourceAccess {
            verb,
            group: "bulkhead.dev",
            resource,
            namespace,
        }
    }
}

/// A static token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Admin,
}

/// Who sent an authenticated request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The name the audit log and the page show.
    pub name: String,
    kind: CallerKind,
}

#[derive(Debug, Clone)]
enum CallerKind {
    Static(Role),
    Kubernetes(Reviewed),
}

/// One line of the tokens file.
struct StaticToken {
    role: Role,
    name: String,
    token: Vec<u8>,
}

/// The tokens file, re-read when its modification time changes.
pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<(Option<SystemTime>, Arc<Vec<StaticToken>>)>,
}

/// A token shorter than this is refused when the file is read: it could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

fn parse_tokens(text: &str, path: &Path) -> anyhow::Result<Vec<StaticToken>> {
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [role, name, token] = fields[..] else {
            anyhow::bail!("{}: write each token as `ROLE NAME TOKEN`", at());
        };
        let role = match role {
            "viewer" => Role::Viewer,
            "admin" => Role::Admin,
            other => anyhow::bail!("{}: role {other:?} is neither viewer nor admin", at()),
        };
        if token.len() < MIN_TOKEN_LEN {
            anyhow::bail!(
                "{}: the token of {name:?} has {} characters; use at least {MIN_TOKEN_LEN} random ones (e.g. `openssl rand -hex 32`)",
                at(),
                token.len()
            );
        }
        tokens.push(StaticToken {
            role,
            name: name.to_string(),
            token: token.as_bytes().to_vec(),
        });
    }
    if tokens.is_empty() {
        anyhow::bail!("{} lists no token", path.display());
    }
    Ok(tokens)
}

impl TokenFile {
    /// Reads `path` now: a missing or malformed file fails the start.
    pub fn open(path: &Path) -> anyhow::Result<TokenFile> {
        let file = TokenFile {
            path: path.to_path_buf(),
            loaded: Mutex::new((None, Arc::new(Vec::new()))),
        };
        file.current()?;
        Ok(file)
    }

    /// The tokens, re-read if the file changed. A file that became unreadable or malformed
    /// keeps the last good tokens (logged), like a manifest that stops validating.
    fn current(&self) -> anyhow::Result<Arc<Vec<StaticToken>>> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("token file lock poisoned"))?;
        if loaded.0.is_some() && loaded.0 == modified {
            return Ok(loaded.1.clone());
        }
        let read = std::fs::read_to_string(&self.path)
            .map_err(anyhow::Error::from)
            .and_then(|t| parse_tokens(&t, &self.path));
        match read {
            Ok(tokens) => {
                *loaded = (modified, Arc::new(tokens));
                Ok(loaded.1.clone())
            }
            Err(e) if loaded.0.is_some() => {
                tracing::error!(error = %format!("{e:#}"), "cannot re-read the HTTP tokens file; the previous tokens stay in force");
                loaded.0 = modified;
                Ok(loaded.1.clone())
            }
            Err(e) => Err(e.context(format!("read the HTTP tokens {}", self.path.display()))),
        }
    }

    fn find(&self, token: &str) -> Option<(Role, String)> {
        let tokens = self.current().ok()?;
        let mut found = None;
        // Every entry is compared, in constant time, whatever matches.
        for t in tokens.iter() {
            if bool::from(t.token.as_slice().ct_eq(token.as_bytes())) {
                found = Some((t.role, t.name.clone()));
            }
        }
        found
    }
}

/// How the HTTP API authenticates and authorizes.
pub enum WebAuth {
    Off,
    Tokens(TokenFile),
    Kubernetes(Reviewer),
}

impl WebAuth {
    pub fn enabled(&self) -> bool {
        !matches!(self, WebAuth::Off)
    }

    /// Who sent the request: `Ok(None)` when authentication is off, 401 without a valid token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized("this API needs a token: send Authorization: Bearer <token>".into())
            })?;
        match self {
            WebAuth::Off => Ok(None),
            WebAuth::Tokens(file) => file
                .find(token)
                .map(|(role, name)| {
                    Some(Caller {
                        name,
                        kind: CallerKind::Static(role),
                    })
                })
                .ok_or_else(|| unauthorized("the token is not valid".into())),
            WebAuth::Kubernetes(reviewer) => match reviewer.review_token(token).await {
                Ok(who) => Ok(Some(Caller {
                    name: who.username.clone(),
                    kind: CallerKind::Kubernetes(who),
                })),
                Err(e @ ReviewError::Rejected(_)) => Err(unauthorized(e.to_string())),
                Err(e @ ReviewError::Unavailable(_)) => Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.to_string(),
                )),
            },
        }
    }

    /// Whether `caller` may do `want`: 403 with what is missing if not.
    pub async fn authorize(&self, caller: Option<&Caller>, want: &Want) -> Result<(), ApiError> {
        let Some(caller) = caller else {
            return if self.enabled() {
                Err(unauthorized("this API needs a token".into()))
            } else {
                Ok(())
            };
        };
        let allowed = match (&caller.kind, want) {
            (CallerKind::Static(_), Want::Read) => true,
            (CallerKind::Static(role), _) => *role == Role::Admin,
            (CallerKind::Kubernetes(who), want) => match self {
                WebAuth::Kubernetes(reviewer) => reviewer
                    .allowed(who, &want.access())
                    .await
                    .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
                _ => false,
            },
        };
        if allowed {
            return Ok(());
        }
        let what = match (&caller.kind, want) {
            (CallerKind::Static(_), _) => {
                "quarantine and release need an admin token; this one is a viewer's".to_string()
            }
            (CallerKind::Kubernetes(_), want) => {
                format!("{} may not {}", caller.name, want.access())
            }
        };
        Err(ApiError::new(StatusCode::FORBIDDEN, what))
    }
}

fn unauthorized(message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

/// Axum middleware for the `/api/*` routes: authenticates the request, checks that its caller
/// may read, and hands the [`Caller`] to the handler (for writes and the audit log).
pub async fn require(State(auth): State<Arc<WebAuth>>, mut req: Request, next: Next) -> Response {
    let caller = match auth.authenticate(req.headers()).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = auth.authorize(caller.as_ref(), &Want::Read).await {
        return e.into_response();
    }
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    next.run(req).await
}
