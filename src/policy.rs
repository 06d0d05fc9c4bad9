//! Who may do what: clients (by certificate identity), their tenants and roles, signing
//! policies, and rate limits per policy, per tenant and per client.
//!
//! Built from the reloadable configuration; a reload builds a new `Policies` and swaps it in.
//! Rate limiters live in [`Limiters`], outside `Policies`, so a reload keeps the state of every
//! limiter whose rate did not change. A request takes its tokens from every limit that applies
//! (policy, tenant, client) or from none: a refusal by one limit leaves the others untouched.
//! Pure logic apart from the rate-limiter clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ClientConfig, DynamicConfig, PolicyConfig, RateLimit, Role};
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
    #[error("rate limit of {scope} `{name}` exceeded")]
    RateLimited {
        /// `policy`, `tenant` or `client`.
        scope: &'static str,
        name: String,
        retry_after: Duration,
    },
}

/// What a rate limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Policy,
    Tenant,
    Client,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Policy => "policy",
            Scope::Tenant => "tenant",
            Scope::Client => "client",
        }
    }
}

/// One rate limiter and what it limits: a token bucket of `burst` tokens refilled at
/// `per_second`.
pub struct Limiter {
    scope: Scope,
    name: String,
    rate: RateLimit,
    /// (tokens available, when they were counted); guarded by its mutex, held only to check
    /// and take.
    bucket: Mutex<(f64, Instant)>,
}

/// Every rate limiter, kept across reloads: [`Policies::with_limiters`] reuses a limiter (and
/// its state) whenever its scope, name and rate are unchanged.
#[derive(Default)]
pub struct Limiters {
    /// Guarded by its mutex; only touched when a configuration is built.
    by_name: Mutex<HashMap<(Scope, String), Arc<Limiter>>>,
}

impl Limiters {
    fn limiter(&self, scope: Scope, name: &str, rate: RateLimit) -> Arc<Limiter> {
        let mut map = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope, name.to_owned());
        if let Some(l) = map.get(&key).filter(|l| l.rate == rate) {
            return Arc::clone(l);
        }
        let l = Arc::new(Limiter {
            scope,
            name: name.to_owned(),
            rate,
            bucket: Mutex::new((f64::from(rate.burst()), Instant::now())),
        });
        map.insert(key, Arc::clone(&l));
        l
    }

    /// Forget limiters the configuration no longer names.
    fn retain(&self, keep: &[Arc<Limiter>]) {
        let mut map = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, l| keep.iter().any(|k| Arc::ptr_eq(k, l)));
    }
}

impl Limiter {
    fn refused(&self, retry_after: Duration) -> Error {
        Error::RateLimited {
            scope: self.scope.as_str(),
            name: self.name.clone(),
            retry_after,
        }
    }
}

/// Take `n` tokens (a batch) from every bucket in `limiters`, or from none: a request refused
/// by one limit leaves the others untouched. More than a bucket's burst is refused whole. The
/// buckets are locked in the order given; callers always give policy, tenant, client, so two
/// requests never wait for each other in opposite orders.
fn take_all(limiters: &[&Limiter], n: u32, now: Instant) -> Result<(), Error> {
    if n == 0 {
        return Ok(());
    }
    let want = f64::from(n);
    let mut guards: Vec<_> = limiters
        .iter()
        .map(|l| l.bucket.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    for (l, g) in limiters.iter().zip(guards.iter_mut()) {
        let (tokens, at) = &mut **g;
        let rate = f64::from(l.rate.per_second.max(1));
        let burst = f64::from(l.rate.burst());
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if want > burst {
            return Err(l.refused(Duration::from_secs(1)));
        }
        if *tokens < want {
            return Err(l.refused(Duration::from_secs_f64((want - *tokens) / rate)));
        }
    }
    for g in &mut guards {
        g.0 -= want;
    }
    Ok(())
}

/// A policy with what is derived from it once per configuration.
pub struct Policy {
    pub config: PolicyConfig,
    /// SHA-256 of the policy's canonical JSON, recorded as evidence.
    pub hash: String,
    limiter: Option<Arc<Limiter>>,
}

pub struct Policies {
    clients: HashMap<String, Arc<ClientConfig>>,
    policies: HashMap<PolicyId, Arc<Policy>>,
    tenant_limiters: HashMap<TenantId, Arc<Limiter>>,
    client_limiters: HashMap<String, Arc<Limiter>>,
}

impl Policies {
    /// With fresh rate limiters (validation, tools, tests).
    pub fn new(config: &DynamicConfig) -> Self {
        Self::with_limiters(config, &Limiters::default())
    }

    /// Reusing the state of `limiters` wherever a rate is unchanged.
    pub fn with_limiters(config: &DynamicConfig, limiters: &Limiters) -> Self {
        let mut used = Vec::new();
        let mut limiter = |scope, name: &str, rate: Option<RateLimit>| {
            rate.map(|r| {
                let l = limiters.limiter(scope, name, r);
                used.push(Arc::clone(&l));
                l
            })
        };
        let clients = config
            .clients
            .iter()
            .map(|c| (c.identity.clone(), Arc::new(c.clone())))
            .collect();
        let policies = config
            .policies
            .iter()
            .map(|p| {
                let policy = Policy {
                    hash: p.hash_hex(),
                    config: p.clone(),
                    limiter: limiter(Scope::Policy, p.id.as_str(), p.rate_limit),
                };
                (p.id.clone(), Arc::new(policy))
            })
            .collect();
        let tenant_limiters = config
            .tenants()
            .into_iter()
            .chain(config.limits.tenants.keys().cloned())
            .filter_map(|t| {
                limiter(Scope::Tenant, t.as_str(), config.limits.tenant(&t)).map(|l| (t, l))
            })
            .collect();
        let client_limiters = config
            .clients
            .iter()
            .filter_map(|c| {
                limiter(
                    Scope::Client,
                    &c.identity,
                    c.rate_limit.or(config.limits.per_client),
                )
                .map(|l| (c.identity.clone(), l))
            })
            .collect();
        limiters.retain(&used);
        Self {
            clients,
            policies,
            tenant_limiters,
            client_limiters,
        }
    }

    /// Take `n` signatures from every limit that applies to `client` signing under `policy`:
    /// the policy's, its tenant's and the client's.
    /// Take `n` tokens from the policy's, the tenant's and the client's limits, all or none.
    pub fn check_rate(&self, client: &ClientConfig, policy: &Policy, n: u32) -> Result<(), Error> {
        let limiters: Vec<&Limiter> = [
            policy.limiter.as_deref(),
            self.tenant_limiters
                .get(&policy.config.tenant)
                .map(|l| &**l),
            self.client_limiters.get(&client.identity).map(|l| &**l),
        ]
        .into_iter()
        .flatten()
        .collect();
        take_all(&limiters, n, Instant::now())
    }

    /// The policy `policy_id`, if configured.
    pub fn policy(&self, policy_id: &PolicyId) -> Option<&Arc<Policy>> {
        self.policies.get(policy_id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
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

    /// Take one signature as `client` under `policy`; the refusing scope, if any.
    fn take(p: &Policies, client: &str, policy: &str, n: u32) -> Option<&'static str> {
        let c = p.client(client).unwrap().clone();
        let pol = p.policy(&policy.parse().unwrap()).unwrap().clone();
        match p.check_rate(&c, &pol, n) {
            Ok(()) => None,
            Err(Error::RateLimited {
                scope, retry_after, ..
            }) => {
                assert!(retry_after <= Duration::from_secs(1));
                Some(scope)
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn rate_limits_per_policy_tenant_and_client() {
        // (extra configuration, requests as (client, policy), the scope refusing the last one)
        let per_policy = "[[policies]]\nid = \"limited\"\ntenant = \"payroll\"\nlegal_standard = \"x\"\nrate_limit = { per_second = 1, burst = 2 }\n";
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            ("", vec![("payroll-app", "payroll-esign"); 50], None),
            (
                per_policy,
                vec![("payroll-app", "limited"); 3],
                Some("policy"),
            ),
            // A tenant's limit spans its policies.
            (
                "[limits]\ntenants = { payroll = { per_second = 1, burst = 2 } }\n[[policies]]\nid = \"other\"\ntenant = \"payroll\"\nlegal_standard = \"x\"\n",
                vec![
                    ("payroll-app", "payroll-esign"),
                    ("payroll-app", "other"),
                    ("payroll-app", "other"),
                ],
                Some("tenant"),
            ),
            // A client's limit spans tenants; another client is not affected.
            (
                "[limits]\nper_client = { per_second = 1, burst = 1 }\n",
                vec![
                    ("payroll-app", "payroll-esign"),
                    ("payroll-app", "payroll-esign"),
                ],
                Some("client"),
            ),
            (
                "[limits]\nper_client = { per_second = 1, burst = 1 }\n",
                vec![("payroll-app", "payroll-esign"), ("both", "hr-esign")],
                None,
            ),
        ];
        for (n, (extra, requests, want)) in cases.into_iter().enumerate() {
            let (p, _) = policies(&format!(
                "[[clients]]\nidentity = \"both\"\ntenants = [\"payroll\", \"hr\"]\nroles = [\"sign\"]\n{extra}"
            ));
            let mut last = None;
            for (client, policy) in requests {
                last = take(&p, client, policy, 1);
            }
            assert_eq!(last, want, "case {n}");
        }
        // A batch above the burst is refused whole.
        let (p, _) = policies(per_policy);
        assert_eq!(take(&p, "payroll-app", "limited", 5), Some("policy"));
    }

    #[test]
    fn a_refusal_by_one_limit_takes_nothing_from_the_others() {
        // A client limited to 1/s floods; the tenant allows 10/s. Its refused requests must not
        // drain the tenant's bucket: another client of the same tenant still signs.
        let (p, _) = policies(
            "[[clients]]\nidentity = \"payroll-2\"\ntenants = [\"payroll\"]\nroles = [\"sign\"]\n\
             [limits]\nper_client = { per_second = 1, burst = 1 }\n\
             per_tenant = { per_second = 10, burst = 10 }\n",
        );
        let refused: Vec<_> = (0..150)
            .map(|_| take(&p, "payroll-app", "payroll-esign", 1))
            .collect();
        assert_eq!(refused[0], None);
        assert!(
            refused[1..].iter().all(|r| *r == Some("client")),
            "{refused:?}"
        );
        assert_eq!(take(&p, "payroll-2", "payroll-esign", 1), None);
        // And a batch refused by the tenant's limit takes nothing from the clients'.
        assert_eq!(take(&p, "payroll-2", "payroll-esign", 11), Some("tenant"));
        let (p, _) = policies(
            "[[clients]]\nidentity = \"payroll-2\"\ntenants = [\"payroll\"]\nroles = [\"sign\"]\n\
             [limits]\nper_client = { per_second = 1, burst = 5 }\n\
             per_tenant = { per_second = 1, burst = 3 }\n",
        );
        assert_eq!(take(&p, "payroll-app", "payroll-esign", 4), Some("tenant"));
        assert_eq!(
            take(&p, "payroll-app", "payroll-esign", 3),
            None,
            "the client's 5 untouched"
        );
    }

    #[test]
    fn rate_limit_state_survives_a_reload_unless_the_rate_changes() {
        let extra = "[limits]\nper_tenant = { per_second = 1, burst = 2 }\n";
        let (_, d) = policies(extra);
        let limiters = Limiters::default();
        let p = Policies::with_limiters(&d, &limiters);
        assert_eq!(take(&p, "payroll-app", "payroll-esign", 2), None);
        // Reloaded with the same rate: still exhausted.
        let p = Policies::with_limiters(&d, &limiters);
        assert_eq!(take(&p, "payroll-app", "payroll-esign", 1), Some("tenant"));
        // A new rate starts a new bucket.
        let (_, d2) = policies("[limits]\nper_tenant = { per_second = 5, burst = 5 }\n");
        let p = Policies::with_limiters(&d2, &limiters);
        assert_eq!(take(&p, "payroll-app", "payroll-esign", 1), None);
    }
}
