//! The internal CA's revocation service: the CRL it keeps signed and the OCSP answers it gives
//! (`[pki]`), built from the key registry's revoked versions.
//!
//! Every replica signs its own CRL from the shared key states: at start, after every change of
//! the revoked set (woken by a revocation here, noticed within [`POLL`] when another replica
//! revoked), and at half of `pki.crl_validity`. CRL numbers are Unix seconds (one more than the
//! last if the clock has not moved), so they only grow. OCSP answers are signed on demand
//! for certificates of this CA only, then cached for half of `pki.ocsp_validity` under the
//! client's `CertID` and the status: a revocation changes the status, so no stale `good` is
//! ever served from the cache.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::App;
use crate::config::Issuer;
use crate::hsm::{CA_KEY_ID, TokenSigner};
use crate::pki::CertInfo;
use crate::pki::revocation::{self as rev, OcspRefusal, Revoked, Status};

/// How often the revoked set is compared with the CRL's.
const POLL: Duration = Duration::from_secs(2);

/// A signed CRL, as served at `/crl`.
#[derive(Debug)]
pub struct PublishedCrl {
    pub der: Vec<u8>,
    pub number: u64,
    pub this_update: u64,
    pub next_update: u64,
    revoked: Vec<Revoked>,
}

/// What the revocation service holds between requests.
pub struct Publisher {
    crl: ArcSwap<Option<Arc<PublishedCrl>>>,
    /// Signed OCSP answers by (client `CertID`, status).
    ocsp: moka::future::Cache<(Vec<u8>, Status), Arc<Vec<u8>>>,
    /// The CA's OCSP identity (name and key hashes), by the CA certificate's fingerprint: the
    /// CA changes only when it is re-issued.
    issuer: std::sync::Mutex<Option<(String, Arc<rev::OcspIssuer>)>>,
    wake: tokio::sync::Notify,
}

impl Publisher {
    pub fn new(ocsp_validity: Duration) -> Self {
        Self {
            crl: ArcSwap::from_pointee(None),
            ocsp: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ocsp_validity / 2)
                .build(),
            issuer: std::sync::Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// The OCSP identity of `ca`, computed once per CA certificate.
    fn issuer(&self, ca: &CertInfo) -> Result<Arc<rev::OcspIssuer>, crate::pki::Error> {
        let mut cached = self.issuer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((fp, issuer)) = cached.as_ref()
            && *fp == ca.fingerprint_sha256
        {
            return Ok(Arc::clone(issuer));
        }
        let issuer = Arc::new(rev::OcspIssuer::new(&ca.der)?);
        *cached = Some((ca.fingerprint_sha256.clone(), Arc::clone(&issuer)));
        Ok(issuer)
    }

    /// Re-sign the CRL now (after a revocation).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// What a `/ocsp` request gets: the DER answer and the status counted in the metrics.
pub struct OcspAnswer {
    pub der: Vec<u8>,
    pub status: &'static str,
}

impl App {
    /// The internal CA, when it issues the tenant certificates (`rotation.issuer = "hsm-ca"`).
    pub fn internal_ca(&self) -> Option<Arc<CertInfo>> {
        if self.dynamic.load().rotation.issuer != Issuer::HsmCa {
            return None;
        }
        self.ca.load().as_ref().clone()
    }

    /// The CRL served now, if the internal CA is in use and one was signed.
    pub fn published_crl(&self) -> Option<Arc<PublishedCrl>> {
        self.internal_ca()?;
        self.pki.crl.load().as_ref().clone()
    }

    /// Revoked certificates of `ca`, by serial.
    fn revoked_certificates(&self, ca: &CertInfo) -> Vec<Revoked> {
        let mut out: Vec<Revoked> = self
            .keys
            .snapshot()
            .all()
            .filter_map(|v| {
                let r = v.revocation.as_ref()?;
                let c = v.certificate.as_ref().filter(|c| c.issuer == ca.subject)?;
                Some(Revoked {
                    serial_hex: c.serial_hex.clone(),
                    revoked_at: r.revoked_at,
                    reason: r.reason,
                    invalid_since: r.compromised_at,
                })
            })
            .collect();
        out.sort_by(|a, b| a.serial_hex.cmp(&b.serial_hex));
        out
    }

    /// Sign and publish a CRL of `revoked`.
    async fn publish_crl(&self, ca: &CertInfo, revoked: Vec<Revoked>) -> Result<(), String> {
        let now = self.clock.unix();
        let last = self.pki.crl.load_full();
        let number = last
            .as_ref()
            .as_ref()
            .map_or(now, |c| now.max(c.number + 1));
        let next_update = now + self.config.pki.crl_validity.as_secs();
        let public = ca.public_key.ok_or("the internal CA key is not P-256")?;
        let signer = TokenSigner::new(Arc::new(self.hsm.clone()), CA_KEY_ID, public);
        let (ca_der, list) = (ca.der.clone(), revoked.clone());
        let der = tokio::task::spawn_blocking(move || {
            rev::crl(&ca_der, number, now, next_update, &list, &signer)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let m = &self.metrics;
        m.crl_this_update.set(now as i64);
        m.crl_next_update.set(next_update as i64);
        m.crl_entries.set(revoked.len() as i64);
        tracing::info!(number, entries = revoked.len(), next_update = %crate::clock::rfc3339(next_update), "CRL signed");
        self.pki.crl.store(Arc::new(Some(Arc::new(PublishedCrl {
            der,
            number,
            this_update: now,
            next_update,
            revoked,
        }))));
        Ok(())
    }

    /// Keep the CRL signed (see the module documentation).
    pub(super) async fn keep_crl_signed(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let mut wait = POLL;
            if let Some(ca) = self.internal_ca() {
                let revoked = self.revoked_certificates(&ca);
                let now = self.clock.unix();
                let half = self.config.pki.crl_validity.as_secs() / 2;
                let due = match self.pki.crl.load().as_ref() {
                    None => true,
                    Some(c) => c.revoked != revoked || now >= c.this_update + half,
                };
                if due && let Err(e) = self.publish_crl(&ca, revoked).await {
                    self.metrics.crl_sign_errors.inc();
                    tracing::error!(error = %e, "cannot sign the CRL; will retry");
                    wait = Duration::from_secs(5);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.pki.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// The status of the certificate with `serial_hex` of `ca`, if `ca` issued it to a key
    /// version Signet holds.
    fn certificate_status(&self, ca: &CertInfo, serial_hex: &str) -> Option<Status> {
        let snap = self.keys.snapshot();
        let v = snap.all().find(|v| {
            v.certificate
                .as_ref()
                .is_some_and(|c| c.serial_hex == serial_hex && c.issuer == ca.subject)
        })?;
        Some(match &v.revocation {
            Some(r) => Status::Revoked {
                at: r.revoked_at,
                reason: r.reason,
            },
            None => Status::Good,
        })
    }

    /// Answer a DER OCSP request (RFC 6960).
    pub async fn ocsp(&self, request: &[u8]) -> OcspAnswer {
        let answer = self.ocsp_answer(request).await;
        self.metrics
            .ocsp_responses
            .with_label_values(&[answer.status])
            .inc();
        answer
    }

    async fn ocsp_answer(&self, request: &[u8]) -> OcspAnswer {
        let refused = |r: OcspRefusal| OcspAnswer {
            der: rev::ocsp_refusal(r),
            status: match r {
                OcspRefusal::Malformed => "malformed",
                OcspRefusal::Unauthorized => "unauthorized",
            },
        };
        let Some(ca) = self.internal_ca() else {
            return refused(OcspRefusal::Unauthorized);
        };
        let issuer = match self.pki.issuer(&ca) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the internal CA certificate");
                return refused(OcspRefusal::Unauthorized);
            }
        };
        let question = match rev::ocsp_question(request, &issuer) {
            Ok(q) => q,
            Err(r) => return refused(r),
        };
        let Some(status) = self.certificate_status(&ca, &question.serial_hex) else {
            return refused(OcspRefusal::Unauthorized);
        };
        let label = match status {
            Status::Good => "good",
            Status::Revoked { .. } => "revoked",
        };
        let key = (question.cert_id_der.clone(), status);
        let signed = self
            .pki
            .ocsp
            .try_get_with(key, async {
                let now = self.clock.unix();
                let next = now + self.config.pki.ocsp_validity.as_secs();
                let public = ca.public_key.ok_or("the internal CA key is not P-256")?;
                let tbs = rev::ocsp_tbs(&question, &issuer, status, now, next)
                    .map_err(|e| e.to_string())?;
                let digest: [u8; 32] = crate::sha256::sha256(&tbs.der);
                let sig = self
                    .hsm
                    .call(move |s| s.sign_prehashed_checked(CA_KEY_ID, &digest, &public))
                    .await
                    .map_err(|e| e.to_string())?;
                rev::ocsp_signed(tbs, &sig)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .await;
        match signed {
            Ok(der) => OcspAnswer {
                der: der.as_ref().clone(),
                status: label,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot sign an OCSP answer");
                OcspAnswer {
                    der: rev::ocsp_try_later(),
                    status: "unavailable",
                }
            }
        }
    }
}
