//! Just enough DER to read a certificate's subject name and public key, so that a CA saved as
//! PEM can be loaded again for signing (rcgen 0.13 only parses certificates with its optional
//! `x509-parser` feature, which we do not build).

use rcgen::{DistinguishedName, DnType, DnValue, Ia5String, PrintableString};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;
const VERSION_TAG: u8 = 0xa0;

/// One TLV element: its tag, its content, the whole encoding, and what follows it.
struct Element<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
    rest: &'a [u8],
}

fn element(input: &[u8]) -> Option<Element<'_>> {
    let (&tag, after_tag) = input.split_first()?;
    let (&first, after_len) = after_tag.split_first()?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || after_len.len() < n {
            return None;
        }
        let len = after_len[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if input.len() < end {
        return None;
    }
    Some(Element {
        tag,
        content: &input[header..end],
        whole: &input[..end],
        rest: &input[end..],
    })
}

fn expect(input: &[u8], tag: u8) -> Option<Element<'_>> {
    element(input).filter(|e| e.tag == tag)
}

/// The parts of a certificate the CA loader needs, as raw DER.
pub(super) struct CertParts<'a> {
    /// The subject `Name`, whole encoding.
    pub subject: &'a [u8],
    /// The `SubjectPublicKeyInfo`, whole encoding.
    pub spki: &'a [u8],
}

/// Finds the subject and public key of an X.509 certificate.
pub(super) fn cert_parts(cert_der: &[u8]) -> Option<CertParts<'_>> {
    let (subject, spki) = subject_and_spki(cert_der)?;
    Some(CertParts {
        subject: subject.whole,
        spki: spki.whole,
    })
}

/// The TBSCertificate's subject and subjectPublicKeyInfo elements.
fn subject_and_spki(cert_der: &[u8]) -> Option<(Element<'_>, Element<'_>)> {
    let cert = expect(cert_der, SEQUENCE)?;
    let tbs = expect(cert.content, SEQUENCE)?;
    let mut fields = tbs.content;
    if fields.first() == Some(&VERSION_TAG) {
        fields = element(fields)?.rest;
    }
    let serial = element(fields)?;
    let signature_alg = expect(serial.rest, SEQUENCE)?;
    let issuer = expect(signature_alg.rest, SEQUENCE)?;
    let validity = expect(issuer.rest, SEQUENCE)?;
    let subject = expect(validity.rest, SEQUENCE)?;
    let spki = expect(subject.rest, SEQUENCE)?;
    Some((subject, spki))
}

/// A certificate's `notAfter`, in seconds since the Unix epoch.
pub(super) fn not_after_unix_s(cert_der: &[u8]) -> Option<i64> {
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    let cert = expect(cert_der, SEQUENCE)?;
    let tbs = expect(cert.content, SEQUENCE)?;
    let mut fields = tbs.content;
    if fields.first() == Some(&VERSION_TAG) {
        fields = element(fields)?.rest;
    }
    let serial = element(fields)?;
    let signature_alg = expect(serial.rest, SEQUENCE)?;
    let issuer = expect(signature_alg.rest, SEQUENCE)?;
    let validity = expect(issuer.rest, SEQUENCE)?;
    let not_before = element(validity.content)?;
    let not_after = element(not_before.rest)?;
    let text = std::str::from_utf8(not_after.content).ok()?;
    let digits = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    // UTCTime YYMMDDHHMMSSZ (years 1950..2049), GeneralizedTime YYYYMMDDHHMMSSZ.
    let (year, rest) = match not_after.tag {
        UTC_TIME if text.len() == 13 => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        GENERALIZED_TIME if text.len() == 15 => (digits(0..4)?, 4),
        _ => return None,
    };
    let field = |i: usize| digits(rest + 2 * i..rest + 2 * i + 2);
    let (month, day, hour, minute, second) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The TBSCertificate's fields after the public key.
fn tbs_after_spki(cert_der: &[u8]) -> Option<&[u8]> {
    subject_and_spki(cert_der).map(|(_, spki)| spki.rest)
}

/// The DNS names and IP addresses of a certificate's subjectAltName extension, in order.
/// `None` if the certificate cannot be read; empty if it has no such names.
pub(super) fn subject_alt_names(cert_der: &[u8]) -> Option<Vec<String>> {
    const EXTENSIONS_TAG: u8 = 0xa3;
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const DNS_NAME: u8 = 0x82; // [2] IMPLICIT IA5String
    const IP_ADDRESS: u8 = 0x87; // [7] IMPLICIT OCTET STRING
                                 // What follows the public key: optional unique ids ([1], [2]), then extensions ([3]).
    let mut rest = tbs_after_spki(cert_der)?;
    let mut names = Vec::new();
    while !rest.is_empty() {
        let field = element(rest)?;
        rest = field.rest;
        if field.tag != EXTENSIONS_TAG {
            continue;
        }
        let mut extensions = expect(field.content, SEQUENCE)?.content;
        while !extensions.is_empty() {
            let extension = expect(extensions, SEQUENCE)?;
            extensions = extension.rest;
            let oid = expect(extension.content, OID)?;
            if oid.content != SAN_OID {
                continue;
            }
            let mut value = element(oid.rest)?;
            if value.tag == BOOLEAN {
                value = element(value.rest)?;
            }
            if value.tag != OCTET_STRING {
                return None;
            }
            let mut general_names = expect(value.content, SEQUENCE)?.content;
            while !general_names.is_empty() {
                let name = element(general_names)?;
                general_names = name.rest;
                match (name.tag, name.content.len()) {
                    (DNS_NAME, _) => names.push(std::str::from_utf8(name.content).ok()?.to_owned()),
                    (IP_ADDRESS, 4) => {
                        let octets: [u8; 4] = name.content.try_into().ok()?;
                        names.push(std::net::Ipv4Addr::from(octets).to_string());
                    }
                    (IP_ADDRESS, 16) => {
                        let octets: [u8; 16] = name.content.try_into().ok()?;
                        names.push(std::net::Ipv6Addr::from(octets).to_string());
                    }
                    _ => {}
                }
            }
        }
    }
    Some(names)
}

/// Rebuilds an rcgen name from a DER `Name`; `None` for encodings rcgen cannot reproduce.
pub(super) fn distinguished_name(name_der: &[u8]) -> Option<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    let mut rdns = expect(name_der, SEQUENCE)?.content;
    while !rdns.is_empty() {
        let set = expect(rdns, SET)?;
        rdns = set.rest;
        let attribute = expect(set.content, SEQUENCE)?;
        if !attribute.rest.is_empty() {
            return None; // multi-valued RDN
        }
        let oid = expect(attribute.content, OID)?;
        let value = element(oid.rest)?;
        let text = std::str::from_utf8(value.content).ok()?.to_owned();
        let value = match value.tag {
            UTF8_STRING => DnValue::Utf8String(text),
            PRINTABLE_STRING => DnValue::PrintableString(PrintableString::try_from(text).ok()?),
            IA5_STRING => DnValue::Ia5String(Ia5String::try_from(text).ok()?),
            _ => return None,
        };
        dn.push(DnType::from_oid(&oid_arcs(oid.content)?), value);
    }
    Some(dn)
}

fn oid_arcs(content: &[u8]) -> Option<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut value: u64 = 0;
    for &byte in content {
        value = value.checked_mul(128)? | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    (!arcs.is_empty()).then_some(arcs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 5), 20_792);
    }

    #[test]
    fn oid_decoding() {
        // 2.5.4.3 (commonName) and 1.2.840.113549 (rsadsi)
        assert_eq!(oid_arcs(&[0x55, 0x04, 0x03]), Some(vec![2, 5, 4, 3]));
        assert_eq!(
            oid_arcs(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            Some(vec![1, 2, 840, 113_549])
        );
        assert_eq!(oid_arcs(&[]), None);
    }

    #[test]
    fn garbage_never_panics() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x82, 0xff],
            &[0x30, 0x05, 0x30],
        ] {
            assert!(cert_parts(input).is_none());
            assert!(distinguished_name(input).is_none());
        }
    }
}
