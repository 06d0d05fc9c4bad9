//! Signet: HSM-backed document digest signing with a tamper-evident evidence log.
//!
//! Module map (see STYLE): `config` → checked types; `hsm` is the only user of PKCS#11;
//! `pki` and `audit::verify` are pure; `service` holds the use cases; `http` is the API.

pub mod audit;
pub mod client;
pub mod clock;
pub mod config;
pub mod dev;
pub mod domain;
pub mod fsutil;
pub mod hsm;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod rotation;
pub mod service;
pub mod sha256;
pub mod storage;
pub mod tls;
pub mod vault;
