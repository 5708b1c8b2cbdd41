//! # ServicePolicy (`bulkhead.dev/v1alpha1`) and where each policy kind sits
//!
//! ServicePolicy is Bulkhead's own, namespaced policy for *service identities*: the subject is
//! chosen by service account and/or pod labels, peers are other service identities (in this or
//! other namespaces), CIDRs, or the entities `world`, `cluster` and `host`.
//!
//! ```yaml
//! apiVersion: bulkhead.dev/v1alpha1
//! kind: ServicePolicy
//! metadata: {namespace: shop, name: api}
//! spec:
//!   mode: Enforce            # or Audit: report what would be denied, let it pass
//!   subject:                 # both optional; both absent = every pod of the namespace
//!     serviceAccount: api
//!     podSelector: {matchLabels: {app: api}}
//!   ingress:
//!   - action: Allow          # Allow (default) or Deny
//!     from:                  # absent or empty = every source
//!     - service: {serviceAccount: web}                      # this namespace
//!     - service: {serviceAccount: probe, namespace: ops}     # a named namespace
//!     - service: {podSelector: {matchLabels: {app: x}}, namespaceSelector: {matchLabels: {team: a}}}
//!     - cidr: 203.0.113.0/24
//!       except: [203.0.113.128/25]
//!     - entity: host         # world | cluster | host
//!     ports:                 # absent or empty = every port and protocol
//!     - {protocol: TCP, port: 8080}
//!     - {protocol: TCP, port: 9000, endPort: 9100}
//!     - {protocol: UDP}      # every UDP port
//!     - {protocol: TCP, port: http}   # a named container port of the destination
//!     - {protocol: ICMP}
//!   egress:
//!   - action: Deny
//!     to: [{entity: world}]
//! ```
//!
//! ## Semantics
//! - A `service` peer selects the pods of the given namespace (default: the policy's own, or
//!   `namespace`, or every namespace matching `namespaceSelector`) that run as `serviceAccount`
//!   (if given) and match `podSelector` (if given).
//! - `world` is every address outside the cluster: addresses no pod has (the reserved world
//!   identity and every CIDR identity). `cluster` is every pod plus the host. `host` is the node.
//! - `cidr` peers behave like NetworkPolicy ipBlocks, including for pod addresses inside them.
//! - An `Enforce` policy with at least one `Allow` rule in a direction **isolates** its subject in
//!   that direction, exactly like a NetworkPolicy: what no application-tier rule admits is denied.
//!   A policy with only `Deny` rules does not isolate: it removes traffic from whatever else
//!   allows it.
//! - `Audit` mode compiles the same entries with `audit: true` (and the isolation into
//!   `staged_isolated_by`): the data plane enforces nothing from them and reports what they would
//!   have done (`Decision::audit_verdict`).
//!
//! ## Tiers (highest first)
//! | tier | what | order inside the tier |
//! |------|------|------|
//! | `quarantine` | Quarantine (`bulkhead.dev/v1alpha1`): per endpoint, its `allow` exceptions (both directions) then a deny-all; identities unchanged | exceptions 0, deny-all 1: an exception beats the deny-all, nothing below is reached |
//! | `admin` | ClusterNetworkPolicy `tier: Admin` | priority, then rule position; Pass skips to the next tier |
//! | `application` | NetworkPolicy **and ServicePolicy**, together | all priority 0: **Deny beats Allow** |
//! | `baseline` | ClusterNetworkPolicy `tier: Baseline` | as admin; only reached when the endpoint is not isolated |
//! | default | allow | |
//!
//! ServicePolicy shares the application tier with NetworkPolicy because both are written by the
//! application's owners for the same pods: isolation from either kind combines (the union of
//! all their Allow rules is admitted), and a ServicePolicy `Deny` overrides any NetworkPolicy or
//! ServicePolicy `Allow` for the traffic it names — it cannot override an admin-tier Accept.
//! See [`crate::ruleset::resolve`] for the one definition of this order.
