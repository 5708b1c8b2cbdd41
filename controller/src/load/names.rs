//! Egress peers by DNS name, shared by ClusterNetworkPolicy `domainNames` and ServicePolicy
//! `fqdn`: the syntax is the rule-set contract's ([`NamePattern`]); where a name peer may be
//! used (egress, admitting rules only) is checked by each kind's loader, at its field.

use crate::error::FieldError;
use crate::ruleset::NamePattern;

/// Upstream allows at most 25 names in one `domainNames` peer.
pub(super) const MAX_DOMAIN_NAMES: usize = 25;

/// One pattern at `path`, or an error there saying what is wrong with it.
pub(super) fn parse_name(
    text: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<NamePattern> {
    match NamePattern::parse(text) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(FieldError::new(path, e.to_string()));
            None
        }
    }
}

/// Why a name peer cannot be used in a rule of this direction and action (`None`: it can).
pub(super) fn name_peer_problem(ingress: bool, admits: bool, accept_word: &str) -> Option<String> {
    if ingress {
        return Some(
            "peers by DNS name are only allowed in egress rules: a name describes a destination"
                .into(),
        );
    }
    if !admits {
        return Some(format!(
            "peers by DNS name are only allowed in {accept_word} rules: addresses are shared between names, so a deny by name would deny other names too, or be bypassed; deny by CIDR instead"
        ));
    }
    None
}
