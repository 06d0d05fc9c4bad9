//! Domain newtypes parsed once at the edge: tenant, policy and key identifiers, digests.
//!
//! Everything past the parsers can rely on these being well-formed; nothing here does I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier or digest failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "tenant must be 1-64 characters of lowercase letters, digits, '-' or '_', starting with a letter or digit"
    )]
    Tenant,
    #[error("policy ID must be 1-128 characters of letters, digits, '.', '-', '_' or ':'")]
    Policy,
    #[error("key ID must read TENANT/vN with N a positive integer (e.g. payroll/v3)")]
    KeyId,
    #[error("digest must be {expected} lowercase hexadecimal characters, got {got} characters")]
    DigestLength { expected: usize, got: usize },
    #[error("digest must be lowercase hexadecimal")]
    DigestHex,
}

/// A tenant: the owner of a signing key and of the policies that use it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TenantId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseError::Tenant)
        }
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A signing policy's identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(String);

impl PolicyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PolicyId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseError::Policy)
        }
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One version of a tenant's key: `TENANT/vN`. Also the `CKA_ID` and `CKA_LABEL` in the token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId {
    tenant: TenantId,
    version: u32,
}

impl KeyId {
    pub fn new(tenant: TenantId, version: u32) -> Self {
        Self { tenant, version }
    }
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl FromStr for KeyId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (tenant, version) = s.split_once("/v").ok_or(ParseError::KeyId)?;
        let tenant = tenant.parse().map_err(|_| ParseError::KeyId)?;
        // Reject leading zeros and signs so every key has exactly one spelling.
        if version.is_empty()
            || version.starts_with('0')
            || !version.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ParseError::KeyId);
        }
        let version = version.parse::<u32>().map_err(|_| ParseError::KeyId)?;
        Ok(Self { tenant, version })
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/v{}", self.tenant, self.version)
    }
}

/// A SHA-256 digest of a document, sent by the client. Never the document itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Sha256Digest {
    // Digests may identify personal documents: keep them out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256Digest(..)")
    }
}

impl FromStr for Sha256Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.len() != 64 {
            return Err(ParseError::DigestLength {
                expected: 64,
                got: s.chars().count(),
            });
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ParseError::DigestHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseError::DigestHex)?;
        Ok(Self(out))
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(TenantId);
serde_via_str!(PolicyId);
serde_via_str!(KeyId);

/// Digest algorithms a policy may allow. Only SHA-256 exists today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    Sha256,
}

impl DigestAlgorithm {
    pub fn as_str(&self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
        }
    }
}

impl FromStr for DigestAlgorithm {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "sha256" => Ok(Self::Sha256),
            _ => Err(()),
        }
    }
}

/// The only signature algorithm Signet produces.
pub const SIGNATURE_ALGORITHM: &str = "ecdsa-p256-sha256";

/// A text that many JSON answers carry unchanged (a key version's certificate PEM): shared,
/// and encoded as a JSON string once, when made, rather than escaped again in every answer
/// (a batch item's answer repeats its certificate, about 700 bytes with escaped newlines).
#[derive(Clone)]
pub struct JsonText {
    text: std::sync::Arc<str>,
    json: std::sync::Arc<serde_json::value::RawValue>,
}

impl JsonText {
    pub fn new(text: impl Into<std::sync::Arc<str>>) -> Self {
        let text = text.into();
        // A string always serialises to JSON.
        #[allow(clippy::expect_used)]
        let json = serde_json::value::to_raw_value(&*text).expect("a string serialises");
        Self {
            text,
            json: json.into(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for JsonText {}

impl Default for JsonText {
    fn default() -> Self {
        Self::new("")
    }
}

impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips_and_rejects_odd_spellings() {
        let k: KeyId = "payroll/v3".parse().unwrap();
        assert_eq!(k.tenant().as_str(), "payroll");
        assert_eq!(k.version(), 3);
        assert_eq!(k.to_string(), "payroll/v3");
        for bad in [
            "payroll/v0",
            "payroll/v03",
            "payroll/v",
            "payroll",
            "/v1",
            "Pay/v1",
            "p/v+1",
            "p/v1x",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn digest_requires_64_lowercase_hex() {
        let ok = "ab".repeat(32);
        assert!(ok.parse::<Sha256Digest>().is_ok());
        assert_eq!(
            "ab".parse::<Sha256Digest>(),
            Err(ParseError::DigestLength {
                expected: 64,
                got: 2
            })
        );
        assert_eq!(
            "AB".repeat(32).parse::<Sha256Digest>(),
            Err(ParseError::DigestHex)
        );
        assert_eq!(
            "zz".repeat(32).parse::<Sha256Digest>(),
            Err(ParseError::DigestHex)
        );
    }

    #[test]
    fn tenant_rules() {
        assert!("payroll".parse::<TenantId>().is_ok());
        assert!("a-1_b".parse::<TenantId>().is_ok());
        for bad in ["", "-a", "A", "a b", "a/b", &"a".repeat(65)] {
            assert!(bad.parse::<TenantId>().is_err(), "{bad}");
        }
    }
    #[test]
    fn json_text_is_served_as_the_json_string_it_holds() {
        for text in [
            "",
            "plain",
            "-----BEGIN CERTIFICATE-----\nMIIB\\\"\u{1}\u{e9}\n",
            "tab\there",
        ] {
            let t = JsonText::new(text);
            assert_eq!(t.as_str(), text);
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                serde_json::to_string(text).unwrap()
            );
            assert_eq!(serde_json::to_value(&t).unwrap(), serde_json::json!(text));
            let back: JsonText = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
            assert_eq!(back, t);
        }
    }
}
