//! Name patterns of egress peers by DNS name, on the wire: typed (exact name or wildcard
//! suffix), and refused on the way in unless they are valid, normalized patterns under a name
//! identity, so an agent never learns addresses for a pattern the controller did not mean.

use bulkhead_ruleset as rs;
use bulkhead_ruleset::identity;

use super::{ConvertError, Result};
use crate::v1 as pb;
use crate::v1::name_pattern::Kind;

pub(crate) fn pattern_to(p: &rs::NamePattern) -> pb::NamePattern {
    let kind = match p {
        rs::NamePattern::Exact(name) => Kind::Exact(name.clone()),
        rs::NamePattern::Wildcard(suffix) => Kind::WildcardSuffix(suffix.clone()),
    };
    pb::NamePattern { kind: Some(kind) }
}

pub(crate) fn name_entry_to(n: &rs::NameEntry) -> pb::NameEntry {
    pb::NameEntry {
        identity: n.identity,
        pattern: Some(pattern_to(&n.pattern)),
    }
}

/// Why a pattern on the wire is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PatternProblem {
    Missing,
    Bad(rs::BadNamePattern),
    /// Valid, but not in the normal form it parses to (upper case, a trailing dot).
    NotNormal {
        text: String,
        normal: String,
    },
}

/// The pattern of a message: valid, normalized, and of the kind it claims.
pub(crate) fn pattern_from(
    p: Option<&pb::NamePattern>,
) -> std::result::Result<rs::NamePattern, PatternProblem> {
    let kind = p
        .and_then(|p| p.kind.as_ref())
        .ok_or(PatternProblem::Missing)?;
    // The text a pattern of this kind prints as; it must parse back to the same kind and text.
    let text = match kind {
        Kind::Exact(name) => name.clone(),
        Kind::WildcardSuffix(suffix) => format!("*.{suffix}"),
    };
    let pattern = rs::NamePattern::parse(&text).map_err(PatternProblem::Bad)?;
    // An exact name cannot be a wildcard in disguise.
    if matches!(kind, Kind::Exact(_)) && pattern.is_wildcard() {
        return Err(PatternProblem::Bad(rs::BadNamePattern::MisplacedWildcard {
            name: text,
        }));
    }
    if pattern.to_string() != text {
        return Err(PatternProblem::NotNormal {
            normal: pattern.to_string(),
            text,
        });
    }
    Ok(pattern)
}

fn name_entry_from(field: &'static str, n: &pb::NameEntry) -> Result<rs::NameEntry> {
    if !identity::is_name(n.identity) {
        return Err(ConvertError::NameIdentity {
            field,
            value: n.identity,
        });
    }
    let pattern = pattern_from(n.pattern.as_ref()).map_err(|p| match p {
        PatternProblem::Missing => ConvertError::Missing { field },
        PatternProblem::Bad(reason) => ConvertError::NamePattern { field, reason },
        PatternProblem::NotNormal { text, normal } => ConvertError::NameNotNormal {
            field,
            normal,
            text,
        },
    })?;
    Ok(rs::NameEntry {
        identity: n.identity,
        pattern,
    })
}

pub(crate) fn name_entries_from(
    field: &'static str,
    list: &[pb::NameEntry],
) -> Result<Vec<rs::NameEntry>> {
    list.iter().map(|n| name_entry_from(field, n)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Valid patterns of both kinds, under their own name identity.
    pub(crate) fn name_entry() -> impl Strategy<Value = rs::NameEntry> {
        (any::<bool>(), "[a-z0-9]{1,6}(\\.[a-z0-9]{1,6}){1,3}").prop_map(|(wild, name)| {
            let text = if wild { format!("*.{name}") } else { name };
            rs::NameEntry::of(rs::NamePattern::parse(&text).expect("a valid pattern"))
        })
    }

    fn wire(identity: u32, kind: Option<Kind>) -> pb::NameEntry {
        pb::NameEntry {
            identity,
            pattern: Some(pb::NamePattern { kind }),
        }
    }

    #[test]
    fn both_kinds_go_over_the_wire_typed() {
        for text in ["api.example.com", "*.example.com"] {
            let n = rs::NameEntry::of(rs::NamePattern::parse(text).expect("valid"));
            let pb = name_entry_to(&n);
            let kind = pb.pattern.as_ref().and_then(|p| p.kind.clone());
            match &n.pattern {
                rs::NamePattern::Exact(_) => {
                    assert_eq!(kind, Some(Kind::Exact("api.example.com".into())))
                }
                rs::NamePattern::Wildcard(_) => {
                    assert_eq!(kind, Some(Kind::WildcardSuffix("example.com".into())))
                }
            }
            assert_eq!(name_entry_from("names", &pb), Ok(n));
        }
    }

    #[test]
    fn garbage_names_are_refused_naming_the_field() {
        let id = identity::FIRST_NAME_IDENTITY + 1;
        let cases = [
            (wire(id, None), "names is missing"),
            (
                pb::NameEntry {
                    identity: id,
                    pattern: None,
                },
                "names is missing",
            ),
            (
                wire(id, Some(Kind::Exact("com".into()))),
                "names: \"com\" has a single label",
            ),
            (wire(id, Some(Kind::Exact("*.example.com".into()))), "'*'"),
            (
                wire(id, Some(Kind::WildcardSuffix("*.example.com".into()))),
                "'*'",
            ),
            (
                wire(id, Some(Kind::Exact("API.example.com".into()))),
                "not in normal form",
            ),
            (
                wire(id, Some(Kind::Exact("api.example.com.".into()))),
                "not in normal form",
            ),
            (
                wire(id, Some(Kind::Exact("a!b.example.com".into()))),
                "character '!'",
            ),
            (
                wire(300, Some(Kind::Exact("api.example.com".into()))),
                "names: 300 is not a name identity",
            ),
        ];
        for (msg, want) in cases {
            let err = name_entry_from("names", &msg).expect_err(want).to_string();
            assert!(err.contains(want), "{msg:?}: {err}");
        }
    }
}
