//! Who may do what: clients (by certificate identity), their tenants and roles, signing
//! policies, and per-policy rate limits.
//!
//! Built from the reloadable configuration; a reload builds a new `Policies` and swaps it in.
//! Pure logic apart from the rate-limiter clock.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::{ClientConfig, DynamicConfig, PolicyConfig, Role};
use crate::domain::{DigestAlgorithm, PolicyId, TenantId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown policy `{0}`")]
    /// The policy ID as sent, sanitised and bounded (it may not even parse).
    UnknownPolicy(String),
    #[error("client `{identity}` may not sign for tenant `{tenant}`")]
    TenantNotAllowed { identity: String, tenant: TenantId },
    #[error("client `{identity}` lacks the `{role}` role")]
    MissingRole {
        identity: String,
        role: &'static str,
    },
    #[error("policy `{policy}` does not allow digest algorithm `{algorithm}`")]
    DigestAlgorithmNotAllowed {
        policy: PolicyId,
        algorithm: &'static str,
    },
    #[error("policy `{0}` requires an Idempotency-Key header")]
    IdempotencyKeyRequired(PolicyId),
    #[error("rate limit of policy `{policy}` exceeded")]
    RateLimited {
        policy: PolicyId,
        retry_after: Duration,
    },
}

/// A policy with what is derived from it once per configuration.
pub struct Policy {
    pub config: PolicyConfig,
    /// SHA-256 of the policy's canonical JSON, recorded as evidence.
    pub hash: String,
    limiter: Option<DefaultDirectRateLimiter>,
}

pub struct Policies {
    clients: HashMap<String, Arc<ClientConfig>>,
    policies: HashMap<PolicyId, Arc<Policy>>,
}

impl Policies {
    pub fn new(config: &DynamicConfig) -> Self {
        let clients = config
            .clients
            .iter()
            .map(|c| (c.identity.clone(), Arc::new(c.clone())))
            .collect();
        let policies = config
            .policies
            .iter()
            .map(|p| {
                let limiter = p.rate_limit.map(|r| {
                    let per_second = NonZeroU32::new(r.per_second).unwrap_or(NonZeroU32::MIN);
                    let burst =
                        NonZeroU32::new(r.burst.unwrap_or(r.per_second)).unwrap_or(NonZeroU32::MIN);
                    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
                });
                (
                    p.id.clone(),
                    Arc::new(Policy {
                        hash: p.hash_hex(),
                        config: p.clone(),
                        limiter,
                    }),
                )
            })
            .collect();
        Self { clients, policies }
    }

    /// The client configured for this certificate identity.
    pub fn client(&self, identity: &str) -> Option<&Arc<ClientConfig>> {
        self.clients.get(identity)
    }

    pub fn is_known(&self, identity: &str) -> bool {
        self.clients.contains_key(identity)
    }

    /// May `client` sign under `policy_id` with `algorithm`? Returns the policy.
    pub fn authorize_sign(
        &self,
        client: &ClientConfig,
        policy_id: &PolicyId,
        algorithm: DigestAlgorithm,
    ) -> Result<&Arc<Policy>, Error> {
        let policy = self
            .policies
            .get(policy_id)
            .ok_or_else(|| Error::UnknownPolicy(policy_id.to_string()))?;
        if !client.roles.contains(&Role::Sign) {
            return Err(Error::MissingRole {
                identity: client.identity.clone(),
                role: "sign",
            });
        }
        if !client.tenants.contains(&policy.config.tenant) {
            return Err(Error::TenantNotAllowed {
                identity: client.identity.clone(),
                tenant: policy.config.tenant.clone(),
            });
        }
        if !policy.config.digest_algorithms.contains(&algorithm) {
            return Err(Error::DigestAlgorithmNotAllowed {
                policy: policy_id.clone(),
                algorithm: algorithm.as_str(),
            });
        }
        Ok(policy)
    }

    /// May `client` read keys and its own evidence of `tenant`?
    pub fn may_read_tenant(client: &ClientConfig, tenant: &TenantId) -> bool {
        client.roles.contains(&Role::Admin)
            || client.roles.contains(&Role::Audit)
            || client.tenants.contains(tenant)
    }

    /// Require `role` (admin actions, or audit reads across tenants).
    pub fn require_role(client: &ClientConfig, role: Role) -> Result<(), Error> {
        if client.roles.contains(&role) {
            Ok(())
        } else {
            Err(Error::MissingRole {
                identity: client.identity.clone(),
                role: role.as_str(),
            })
        }
    }

    /// May `client` read the whole evidence log (all tenants)?
    pub fn may_read_all_evidence(client: &ClientConfig) -> bool {
        client.roles.contains(&Role::Admin) || client.roles.contains(&Role::Audit)
    }
}

impl Policy {
    /// Take one token from the policy's rate limit, if it has one.
    pub fn check_rate(&self) -> Result<(), Error> {
        self.take(1)
    }

    /// Take `n` tokens at once (a batch). A batch larger than the burst is refused whole.
    pub fn take(&self, n: u32) -> Result<(), Error> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Error::RateLimited {
                policy: self.config.id.clone(),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
            Err(_) => Err(Error::RateLimited {
                policy: self.config.id.clone(),
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RateLimit};
    use std::path::Path;

    fn policies(extra: &str) -> (Policies, DynamicConfig) {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
cert = "c"
key = "k"
client_ca = "ca"
metrics_listen = "127.0.0.1:0"
[hsm]
module = "m"
token_label = "t"
pin_env = "P"
[audit]
dir = "a"
[[clients]]
identity = "payroll-app"
tenants = ["payroll"]
roles = ["sign"]
[[clients]]
identity = "auditor"
roles = ["audit"]
[[policies]]
id = "payroll-esign"
tenant = "payroll"
legal_standard = "x"
[[policies]]
id = "hr-esign"
tenant = "hr"
legal_standard = "x"
{extra}
"#
        );
        let c = Config::parse(&text, Path::new("/")).unwrap();
        (Policies::new(&c.dynamic), c.dynamic)
    }

    #[test]
    fn authorization_table() {
        let (p, _) = policies("");
        let app = p.client("payroll-app").unwrap().clone();
        let auditor = p.client("auditor").unwrap().clone();
        let sha = DigestAlgorithm::Sha256;
        let id = |s: &str| s.parse::<PolicyId>().unwrap();
        assert!(p.authorize_sign(&app, &id("payroll-esign"), sha).is_ok());
        assert!(matches!(
            p.authorize_sign(&app, &id("hr-esign"), sha),
            Err(Error::TenantNotAllowed { .. })
        ));
        assert!(matches!(
            p.authorize_sign(&app, &id("nope"), sha),
            Err(Error::UnknownPolicy(_))
        ));
        assert!(matches!(
            p.authorize_sign(&auditor, &id("payroll-esign"), sha),
            Err(Error::MissingRole { .. })
        ));
        assert!(Policies::may_read_tenant(&app, &"payroll".parse().unwrap()));
        assert!(!Policies::may_read_tenant(&app, &"hr".parse().unwrap()));
        assert!(Policies::may_read_tenant(&auditor, &"hr".parse().unwrap()));
        assert!(Policies::require_role(&app, Role::Admin).is_err());
        assert!(!p.is_known("someone-else"));
    }

    #[test]
    fn rate_limit_refuses_after_burst_with_retry_after() {
        let (p, d) = policies("");
        let mut cfg = d.policies[0].clone();
        cfg.rate_limit = Some(RateLimit {
            per_second: 1,
            burst: Some(2),
        });
        let mut dynamic = d.clone();
        dynamic.policies[0] = cfg;
        let p2 = Policies::new(&dynamic);
        let pol = p2
            .policies
            .get(&"payroll-esign".parse::<PolicyId>().unwrap())
            .unwrap();
        assert!(pol.check_rate().is_ok());
        assert!(pol.check_rate().is_ok());
        match pol.check_rate() {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert!(retry_after <= Duration::from_secs(1))
            }
            other => panic!("expected rate limit, got {other:?}"),
        }
        assert!(pol.take(5).is_err(), "a batch above the burst is refused");
        // Policies without a limit never refuse.
        let free = p
            .policies
            .get(&"payroll-esign".parse::<PolicyId>().unwrap())
            .unwrap();
        for _ in 0..100 {
            assert!(free.check_rate().is_ok());
        }
    }
}
