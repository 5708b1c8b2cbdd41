//! Egress peers by DNS name: the name patterns of a rule set and their name identities.
//!
//! A policy may admit egress to a DNS name (ClusterNetworkPolicy `domainNames`, ServicePolicy
//! `fqdn`). Such a peer is a [`NamePattern`]: an exact name, or `*.suffix`, which matches every
//! name with **one or more** labels before `suffix` and never `suffix` itself (as the SIG
//! network-policy-api's NPEP-133 defines `domainNames`). Each pattern stands for one *name
//! identity* ([`name_identity`], in the range reserved in `bulkhead-common`), and policy
//! entries name it like any peer identity. No address has a name identity in the ipcache: the
//! data plane learns, from the DNS answers a pod receives, which addresses the names it asked
//! for resolve to, and attributes to such an address the name identities of every pattern of
//! its node ([`RuleSet::names`](crate::RuleSet::names)) that matches the name the pod asked
//! for. A connection to it is then decided over the entries of the address's own identity *and*
//! of those name identities, with the one precedence ([`crate::decide_with_names`],
//! [`crate::precedence`]).
//!
//! Names compare case-insensitively (DNS does); a pattern is kept in lower case, without a
//! trailing dot (`api.example.com.` is accepted and means `api.example.com`). A valid name has at
//! least two labels, labels of 1-63 letters, digits and inner hyphens or underscores, and at most
//! 253 characters; `*` may only appear as a leading `*.` (upstream's `DomainName` pattern,
//! `^(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$`
//! in `apis/v1beta1/clusternetworkpolicy_types.go`, plus DNS's own length limits).
//! Internationalized names are written in their ASCII (punycode) form, as DNS carries them.
//!
//! Peers by name only *admit*: there is no deny by name. Addresses are shared between names
//! (CDNs, shared load balancers, virtual hosting), so "deny api.evil.com" would either deny
//! every other name that happens to resolve to the same address, or be bypassed by resolving
//! another name of that address (or by not resolving at all): neither is a rule a user can
//! rely on. An allow is safe in both respects: it admits only addresses the pod itself was told
//! by a trusted resolver for an allowed name. Deny what must never be reached by CIDR.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Identity;
use crate::identity::{FIRST_NAME_IDENTITY, NAME_IDENTITY_COUNT};

/// Longest DNS name, in characters of its text form without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
pub const MAX_LABEL_LEN: usize = 63;

/// An egress peer by DNS name, normalized (lower case, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// `*.` and this suffix: every name with one or more labels before the suffix (never the
    /// suffix itself).
    Wildcard(String),
}

/// Why a text is not a [`NamePattern`]. The messages say what to write instead; callers put
/// the field in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadNamePattern {
    #[error("the name is empty: write a DNS name such as api.example.com or *.example.com")]
    Empty,
    #[error(
        "{name:?} is {len} characters long: a DNS name has at most 253 (without the trailing dot)"
    )]
    TooLong { name: String, len: usize },
    #[error("{name:?} has an empty label: write labels separated by single dots")]
    EmptyLabel { name: String },
    #[error("{name:?} has a label of {len} characters: DNS labels have at most 63")]
    LabelTooLong { name: String, len: usize },
    #[error(
        "{name:?} has the character {ch:?}: use letters, digits, '-' and '_' (internationalized names in their xn-- form)"
    )]
    BadCharacter { name: String, ch: char },
    #[error(
        "{name:?} has a label that begins or ends with '-' or '_': labels begin and end with a letter or digit"
    )]
    Hyphen { name: String },
    #[error(
        "{name:?} has a single label: name a domain of at least two labels, e.g. example.com or *.example.com"
    )]
    SingleLabel { name: String },
    #[error(
        "{name:?} uses '*' other than as a leading \"*.\": a wildcard stands for whole leading labels only, e.g. *.example.com"
    )]
    MisplacedWildcard { name: String },
}

impl NamePattern {
    /// Parses and normalizes a pattern: case is folded to lower case, one trailing dot is
    /// dropped, and the syntax is checked (see the module docs).
    pub fn parse(text: &str) -> Result<NamePattern, BadNamePattern> {
        let lowered = text.to_ascii_lowercase();
        let trimmed = lowered.strip_suffix('.').unwrap_or(&lowered);
        if trimmed.is_empty() {
            return Err(BadNamePattern::Empty);
        }
        let name = || text.to_string();
        if trimmed.chars().count() > MAX_NAME_LEN {
            return Err(BadNamePattern::TooLong {
                name: name(),
                len: trimmed.chars().count(),
            });
        }
        let (wildcard, rest) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if rest.contains('*') {
            return Err(BadNamePattern::MisplacedWildcard { name: name() });
        }
        let mut labels = 0;
        for label in rest.split('.') {
            labels += 1;
            if label.is_empty() {
                return Err(BadNamePattern::EmptyLabel { name: name() });
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(BadNamePattern::LabelTooLong {
                    name: name(),
                    len: label.len(),
                });
            }
            if let Some(ch) = label
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
            {
                return Err(BadNamePattern::BadCharacter { name: name(), ch });
            }
            if label.starts_with(['-', '_']) || label.ends_with(['-', '_']) {
                return Err(BadNamePattern::Hyphen { name: name() });
            }
        }
        if labels < 2 {
            return Err(BadNamePattern::SingleLabel { name: name() });
        }
        let rest = rest.to_string();
        Ok(if wildcard {
            NamePattern::Wildcard(rest)
        } else {
            NamePattern::Exact(rest)
        })
    }

    /// Whether a name a pod asked for (any case, with or without the trailing dot) matches: an
    /// exact pattern that very name, a wildcard one every name with one or more labels before
    /// its suffix.
    pub fn matches(&self, queried: &str) -> bool {
        let q = queried.strip_suffix('.').unwrap_or(queried);
        match self {
            NamePattern::Exact(name) => q.eq_ignore_ascii_case(name),
            NamePattern::Wildcard(suffix) => {
                // `head` must be one or more labels, `tail` the dot and the suffix.
                let Some(cut) = q.len().checked_sub(suffix.len() + 1) else {
                    return false;
                };
                if cut == 0 || !q.is_char_boundary(cut) {
                    return false;
                }
                let (head, tail) = q.split_at(cut);
                tail.starts_with('.')
                    && tail[1..].eq_ignore_ascii_case(suffix)
                    && !head.starts_with('.')
                    && !head.ends_with('.')
            }
        }
    }

    /// Whether it is a `*.` pattern.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, NamePattern::Wildcard(_))
    }

    /// The name an exact pattern stands for, the suffix of a wildcard.
    pub fn name(&self) -> &str {
        match self {
            NamePattern::Exact(n) | NamePattern::Wildcard(n) => n,
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

impl FromStr for NamePattern {
    type Err = BadNamePattern;

    fn from_str(s: &str) -> Result<NamePattern, BadNamePattern> {
        NamePattern::parse(s)
    }
}

impl TryFrom<String> for NamePattern {
    type Error = BadNamePattern;

    fn try_from(s: String) -> Result<NamePattern, BadNamePattern> {
        NamePattern::parse(&s)
    }
}

impl From<NamePattern> for String {
    fn from(p: NamePattern) -> String {
        p.to_string()
    }
}

/// The name identity of a pattern: a function of its normalized text alone (64-bit FNV-1a,
/// reduced into the reserved range), so every node, every controller run and every restart
/// gives a pattern the same number and learned addresses stay attributed across them.
///
/// Two different patterns may hash to the same number (with a hundred distinct patterns in
/// use in a cluster the chance is about 1 in 54 000, with a thousand about 1 in 540). As that
/// would let one name's learned addresses admit what the other's rules admit, the controller
/// never gives one number to two patterns: a pattern whose number another pattern in use
/// already has admits nothing (fail closed), and the controller says so. A rule set never maps
/// one number to two patterns.
pub fn name_identity(pattern: &NamePattern) -> Identity {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = pattern.to_string();
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    FIRST_NAME_IDENTITY + (h % u64::from(NAME_IDENTITY_COUNT)) as u32
}

/// One name pattern of a node's rule set and its name identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NameEntry {
    pub identity: Identity,
    pub pattern: NamePattern,
}

impl NameEntry {
    /// The entry of a pattern, with its [`name_identity`].
    pub fn of(pattern: NamePattern) -> NameEntry {
        NameEntry {
            identity: name_identity(&pattern),
            pattern,
        }
    }
}

/// The name identities of the patterns in `names` that match a name a pod asked for, sorted:
/// what the data plane attributes to the addresses of the answer.
pub fn matching_names(names: &[NameEntry], queried: &str) -> Vec<Identity> {
    let mut ids: Vec<Identity> = names
        .iter()
        .filter(|n| n.pattern.matches(queried))
        .map(|n| n.identity)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity;

    fn p(s: &str) -> NamePattern {
        NamePattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn patterns_are_normalized_to_lower_case_without_the_trailing_dot() {
        assert_eq!(
            p("API.Example.COM."),
            NamePattern::Exact("api.example.com".into())
        );
        assert_eq!(
            p("*.Example.com"),
            NamePattern::Wildcard("example.com".into())
        );
        assert_eq!(p("*.example.com").to_string(), "*.example.com");
        assert_eq!(
            p("xn--bcher-kva.example").to_string(),
            "xn--bcher-kva.example"
        );
        // Inner underscores, as upstream's DomainName pattern allows (`[-a-zA-Z0-9_]*`).
        assert_eq!(
            p("API_X.example.com"),
            NamePattern::Exact("api_x.example.com".into())
        );
        for s in [
            "api.example.com",
            "*.a.b.c",
            "1.2.example",
            "a-b.c-d",
            "a_b.example.com",
        ] {
            assert_eq!(p(s).to_string().parse::<NamePattern>(), Ok(p(s)));
        }
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            (".", "empty"),
            ("com", "single label"),
            ("*.com", "single label"),
            ("*", "'*'"),
            ("api..example.com", "empty label"),
            (".example.com", "empty label"),
            ("api.example.com..", "empty label"),
            ("a*.example.com", "'*'"),
            ("api.*.example.com", "'*'"),
            ("*.*.example.com", "'*'"),
            ("**.example.com", "'*'"),
            ("_sip.example.com", "begins or ends"),
            ("api_.example.com", "begins or ends"),
            ("bücher.example", "character 'ü'"),
            ("-api.example.com", "begins or ends"),
            ("api-.example.com", "begins or ends"),
            ("api example.com", "character ' '"),
        ];
        for (text, want) in cases {
            let err = NamePattern::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(
            NamePattern::parse(&long_label)
                .expect_err("64")
                .to_string()
                .contains("at most 63")
        );
        assert!(NamePattern::parse(&format!("{}.com", "a".repeat(63))).is_ok());
        let label = "a".repeat(63);
        let long = [label.as_str(); 4].join("."); // 255 characters
        assert!(
            NamePattern::parse(&long)
                .expect_err("255")
                .to_string()
                .contains("at most 253")
        );
        assert!(NamePattern::parse(&long[2..]).is_ok(), "253 fits");
        assert!(
            NamePattern::parse(&format!("{}.", &long[2..])).is_ok(),
            "253 and a dot"
        );
    }

    #[test]
    fn exact_names_match_only_themselves_in_any_case() {
        let exact = p("api.example.com");
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches("API.Example.Com."));
        for other in [
            "example.com",
            "www.api.example.com",
            "api.example.co",
            "xapi.example.com",
            "",
        ] {
            assert!(!exact.matches(other), "{other}");
        }
    }

    #[test]
    fn a_wildcard_matches_one_or_more_labels_but_never_the_bare_suffix() {
        let wild = p("*.example.com");
        for yes in [
            "www.example.com",
            "blog.example.com.",
            "latest.blog.example.com",
            "A.B.C.EXAMPLE.COM",
        ] {
            assert!(wild.matches(yes), "{yes}");
        }
        for no in [
            "example.com",
            "example.com.",
            ".example.com",
            "my-example.com",
            "wwwexample.com",
            "a..example.com",
            "wikipedia.org",
            "www.example.com.evil",
            "ü.example.com.x",
        ] {
            assert!(!wild.matches(no), "{no}");
        }
    }

    #[test]
    fn name_identities_are_stable_in_their_range_and_tell_kinds_apart() {
        let a = name_identity(&p("api.example.com"));
        assert_eq!(a, name_identity(&p("API.example.com.")), "normalized first");
        assert!(identity::is_name(a));
        assert_ne!(a, name_identity(&p("*.api.example.com")));
        assert_ne!(
            name_identity(&p("*.example.com")),
            name_identity(&p("example.com"))
        );
        // Pinned: a change of the function renumbers every learned address on upgrade.
        assert_eq!(
            name_identity(&p("api.example.com")),
            0x2000_0000 + (fnv("api.example.com") % (1 << 28)) as u32
        );
        for s in ["a.b", "*.a.b", "x.y.z"] {
            let id = name_identity(&p(s));
            assert!(identity::is_name(id), "{s}: {id:#x}");
            assert!(id != identity::ANY && id >= identity::FIRST_NAME_IDENTITY);
        }
        assert!(!identity::is_name(identity::FIRST_NAME_IDENTITY - 1));
        assert!(!identity::is_name(
            identity::FIRST_NAME_IDENTITY + identity::NAME_IDENTITY_COUNT
        ));
        assert!(!identity::is_name(identity::ANY));
    }

    fn fnv(s: &str) -> u64 {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn matching_names_lists_every_matching_pattern_once() {
        let names = vec![
            NameEntry::of(p("api.example.com")),
            NameEntry::of(p("*.example.com")),
            NameEntry::of(p("*.other.org")),
        ];
        let got = matching_names(&names, "API.example.com.");
        let mut want = vec![names[0].identity, names[1].identity];
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(matching_names(&names, "example.com").is_empty());
    }

    #[test]
    fn patterns_serialize_as_their_text_and_refuse_bad_text() {
        let e = NameEntry::of(p("*.example.com"));
        let json = serde_json::to_string(&e).expect("json");
        assert!(json.contains("\"*.example.com\""), "{json}");
        assert_eq!(serde_json::from_str::<NameEntry>(&json).expect("back"), e);
        let bad = json.replace("*.example.com", "*.com");
        assert!(serde_json::from_str::<NameEntry>(&bad).is_err());
    }
}
