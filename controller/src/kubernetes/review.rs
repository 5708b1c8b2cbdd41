//! Who holds a bearer token and what they may do, asked of the Kubernetes API server: a
//! `TokenReview` names the token's user, a `SubjectAccessReview` answers whether that user may
//! do one thing. Both are remembered for a short while, so a page polling the API or an agent
//! reconnecting does not cost a review each time.
//!
//! Two users: the controller's HTTP API with `--http-auth kubernetes` (any user, RBAC decides),
//! and agents that share the chart's `bulkhead-agent` certificate with `--agent-token-review`:
//! such an agent also sends its pod's service-account token (audience `bulkhead-controller`),
//! and [`AgentTokenReview`] finds the node that pod runs on, so one node's agent cannot speak
//! for another (issue 21, finding 12).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};

/// How long an accepted token, or an access decision, is trusted without asking again.
pub const REVIEW_TTL: Duration = Duration::from_secs(60);
/// How long a refused token stays refused without asking again.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// Remembered reviews at most; past it the expired ones go, then all.
const CACHE_ENTRIES: usize = 10_000;

/// The user a token belongs to, as the API server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Reviewed {
    /// The first value of an `extra` key, e.g. `authentication.kubernetes.io/pod-name`.
    pub fn extra_value(&self, key: &str) -> Option<&str> {
        self.extra
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("the token was not accepted{0}")]
    Rejected(String),
    #[error("cannot review the token with the kubernetes api: {0}")]
    Unavailable(String),
}

/// One thing a user may or may not do: `verb` on `resource` of `group`, in `namespace` (or
/// cluster-wide).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceAccess {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub namespace: Option<String>,
}

impl std::fmt::Display for ResourceAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}.{}", self.verb, self.resource, self.group)?;
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " (cluster-wide)"),
        }
    }
}

type Cached<T> = Mutex<HashMap<String, (Instant, T)>>;

fn remember<T>(cache: &Cached<T>, key: String, value: T) {
    let Ok(mut c) = cache.lock() else { return };
    if c.len() >= CACHE_ENTRIES {
        let now = Instant::now();
        c.retain(|_, (until, _)| *until > now);
        if c.len() >= CACHE_ENTRIES {
            c.clear();
        }
    }
    c.insert(key, (Instant::now(), value));
}

fn recall<T: Clone>(cache: &Cached<T>, key: &str, ttl: impl Fn(&T) -> Duration) -> Option<T> {
    let c = cache.lock().ok()?;
    let (at, v) = c.get(key)?;
    (at.elapsed() < ttl(v)).then(|| v.clone())
}

/// Token and access reviews against one API server, remembered for [`REVIEW_TTL`].
pub struct Reviewer {
    client: Client,
    /// The audiences a token must be for (empty: the API server's own).
    audiences: Vec<String>,
    tokens: Cached<Result<Reviewed, ReviewError>>,
    access: Cached<bool>,
}

impl Reviewer {
    pub fn new(client: Client, audiences: Vec<String>) -> Reviewer {
        Reviewer {
            client,
            audiences,
            tokens: Mutex::default(),
            access: Mutex::default(),
        }
    }

    /// Who holds `token`. An unreachable API server is an error, never an answer.
    pub async fn review_token(&self, token: &str) -> Result<Reviewed, ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Rejected(": it is empty".into()));
        }
        let ttl = |r: &Result<Reviewed, ReviewError>| match r {
            Ok(_) => REVIEW_TTL,
            Err(_) => REFUSAL_TTL,
        };
        if let Some(known) = recall(&self.tokens, token, ttl) {
            return known;
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        let result = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => Ok(Reviewed {
                username: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }),
            _ => Err(ReviewError::Rejected(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .map(|e| format!(": {}", e.to_lowercase()))
                    .unwrap_or_default(),
            )),
        };
        remember(&self.tokens, token.to_string(), result.clone());
        result
    }

    /// Whether `who` may do `what` (RBAC or whatever authorizer the cluster runs).
    pub async fn allowed(
        &self,
        who: &Reviewed,
        what: &ResourceAccess,
    ) -> Result<bool, ReviewError> {
        let key = format!("{}\0{}\0{what}", who.username, who.uid);
        if let Some(known) = recall(&self.access, &key, |_| REVIEW_TTL) {
            return Ok(known);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.username.clone()),
                uid: (!who.uid.is_empty()).then(|| who.uid.clone()),
                groups: Some(who.groups.clone()),
                extra: (!who.extra.is_empty()).then(|| who.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(what.verb.into()),
                    group: Some(what.group.into()),
                    resource: Some(what.resource.into()),
                    namespace: what.namespace.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        remember(&self.access, key, allowed);
        Ok(allowed)
    }
}

/// The token's node, as [`AgentTokenReview::node_of`] finds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentTokenError {
    #[error(transparent)]
    Review(#[from] ReviewError),
    #[error(
        "the token belongs to {0:?}, not to the agents' service account {1}: mount the agent's projected token (--token-file)"
    )]
    NotAgent(String, String),
    #[error("the token names no pod: use a projected service-account token of the agent pod")]
    NoPod,
    #[error("the token's pod {0} is gone or was replaced")]
    PodGone(String),
    #[error("the token's pod {0} runs on no node yet")]
    Unscheduled(String),
}

/// Agents' service-account tokens: only tokens of pods of one service account, each standing
/// for the node its pod runs on.
pub struct AgentTokenReview {
    reviewer: Reviewer,
    namespace: String,
    service_account: String,
    /// Pod uid → its node (a pod never moves).
    nodes: Cached<String>,
}

const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

impl AgentTokenReview {
    /// Tokens for `audience` of the service account `namespace/name`.
    pub fn new(client: Client, audience: String, namespace: String, name: String) -> Self {
        AgentTokenReview {
            reviewer: Reviewer::new(client, vec![audience]),
            namespace,
            service_account: name,
            nodes: Mutex::default(),
        }
    }

    /// The node whose agent holds `token`: the `node-name` the API server put in the token
    /// (Kubernetes ≥ 1.30), else the node of the pod the token is bound to (looked up, with its
    /// uid checked, so a token of a deleted pod does not pass for a new one of the same name).
    pub async fn node_of(&self, token: &str) -> Result<String, AgentTokenError> {
        let who = self.reviewer.review_token(token).await?;
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        );
        if who.username != expected {
            return Err(AgentTokenError::NotAgent(
                who.username,
                format!("{}/{}", self.namespace, self.service_account),
            ));
        }
        if let Some(node) = who.extra_value(NODE_NAME).filter(|n| !n.is_empty()) {
            return Ok(node.to_string());
        }
        let (Some(pod), Some(uid)) = (who.extra_value(POD_NAME), who.extra_value(POD_UID)) else {
            return Err(AgentTokenError::NoPod);
        };
        if let Some(node) = recall(&self.nodes, uid, |_| REVIEW_TTL) {
            return Ok(node);
        }
        let name = format!("{}/{pod}", self.namespace);
        let found = Api::<Pod>::namespaced(self.reviewer.client.clone(), &self.namespace)
            .get_opt(pod)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
            .ok_or_else(|| AgentTokenError::PodGone(name.clone()))?;
        let node = found
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or(AgentTokenError::Unscheduled(name))?;
        remember(&self.nodes, uid.to_string(), node.clone());
        Ok(node)
    }
}
