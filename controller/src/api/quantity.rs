//! Kubernetes quantities, read exactly as apimachinery's `resource.Quantity` reads them:
//! `<sign><digits>[.<digits>]<suffix>`, the suffix binary (`Ki` ... `Ei`), decimal (`m`, none,
//! `k`, `M`, `G`, `T`, `P`, `E`) or an exponent (`e3`, `E-2`). Integer arithmetic only, so
//! `1e400` is "too large", never infinity, and `1024000m` is 1024. kube_quantity (the crate)
//! goes through `f64` and multiplies unchecked, which is why this is ployz's own.

/// Why a string is not a usable byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "is not a Kubernetes quantity (a number with an optional suffix such as Ki, Mi, Gi, k, M, G or e6)"
    )]
    Malformed,
    #[error("is negative")]
    Negative,
    #[error("is larger than 16Ei")]
    TooLarge,
}

const BINARY: [(&str, u32); 6] = [
    ("Ki", 1),
    ("Mi", 2),
    ("Gi", 3),
    ("Ti", 4),
    ("Pi", 5),
    ("Ei", 6),
];
const DECIMAL: [(&str, i64); 7] = [
    ("m", -3),
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];

/// The value of `q` as a whole number, rounded up as `Quantity.Value()` does.
pub fn parse_u64(q: &str) -> Result<u64, QuantityError> {
    let (negative, rest) = match q.as_bytes().first() {
        Some(b'-') => (true, &q[1..]),
        Some(b'+') => (false, &q[1..]),
        _ => (false, q),
    };
    let digits_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(digits_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(QuantityError::Malformed);
    }
    let (binary, mut exp10) = parse_suffix(suffix)?;
    // Significant digits only: leading zeros of the whole, trailing zeros of the fraction.
    let frac = frac.trim_end_matches('0');
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    exp10 -= i64::try_from(frac.len()).map_err(|_| QuantityError::TooLarge)?;
    if digits.is_empty() {
        return Ok(0);
    }
    if negative {
        return Err(QuantityError::Negative);
    }
    // 38 digits fit u128; more than that can only be an overflow (the zeros are gone).
    if digits.len() > 38 {
        return Err(QuantityError::TooLarge);
    }
    let mantissa: u128 = digits.parse().map_err(|_| QuantityError::Malformed)?;
    let scaled = mantissa
        .checked_mul(1024u128.pow(binary))
        .ok_or(QuantityError::TooLarge)?;
    let value = if exp10 >= 0 {
        u32::try_from(exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .and_then(|f| scaled.checked_mul(f))
            .ok_or(QuantityError::TooLarge)?
    } else {
        match u32::try_from(-exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
        {
            Some(f) => scaled.div_ceil(f),
            // Smaller than any divisor u128 can hold: a positive fraction below one.
            None => 1,
        }
    };
    u64::try_from(value).map_err(|_| QuantityError::TooLarge)
}

/// The suffix as a power of 1024 and a power of ten.
fn parse_suffix(suffix: &str) -> Result<(u32, i64), QuantityError> {
    if suffix.is_empty() {
        return Ok((0, 0));
    }
    if let Some((_, n)) = BINARY.iter().find(|(s, _)| *s == suffix) {
        return Ok((*n, 0));
    }
    if let Some((_, e)) = DECIMAL.iter().find(|(s, _)| *s == suffix) {
        return Ok((0, *e));
    }
    let exponent = suffix
        .strip_prefix('e')
        .or_else(|| suffix.strip_prefix('E'))
        .ok_or(QuantityError::Malformed)?;
    let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QuantityError::Malformed);
    }
    // Far beyond any u64 either way; the sign decides which way.
    let e: i64 = exponent.parse().unwrap_or(if exponent.starts_with('-') {
        -1000
    } else {
        1000
    });
    Ok((0, e.clamp(-1000, 1000)))
}

/// Bounds of `spec.transfer.bandwidthLimit`, bytes per second; the CRD's rule says the same.
pub const BANDWIDTH_MIN: (&str, u64) = ("1Ki", 1 << 10);
pub const BANDWIDTH_MAX: (&str, u64) = ("1Ei", 1 << 60);

/// `spec.transfer.bandwidthLimit` in bytes per second, or what is wrong with it, naming the
/// field and the expected form. ployzctl, the agent and the CRD apply the same bounds.
pub fn bandwidth_limit(q: &str) -> Result<u64, String> {
    let expected = format!(
        "a quantity of bytes per second from {} to {}, for example 100Mi",
        BANDWIDTH_MIN.0, BANDWIDTH_MAX.0
    );
    match parse_u64(q) {
        Ok(v) if (BANDWIDTH_MIN.1..=BANDWIDTH_MAX.1).contains(&v) => Ok(v),
        Ok(_) => Err(format!(
            "spec.transfer.bandwidthLimit {q:?} is out of range: expected {expected}"
        )),
        Err(e) => {
            // "100MB", "1GiB", "100MB/s": units as people write them, the fix in the message.
            let bare = q.trim_end_matches("/s").trim_end_matches(['B', 'b']);
            let hint = if bare != q && parse_u64(bare).is_ok() {
                format!(" (did you mean {bare}? quantities have no B; Mi is 2^20, M is 10^6)")
            } else {
                String::new()
            };
            Err(format!(
                "spec.transfer.bandwidthLimit {q:?} {e}{hint}: expected {expected}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_written_with_a_b_get_the_quantity_they_meant() {
        for (input, meant) in [("100MB", "100M"), ("1GiB", "1Gi"), ("100MB/s", "100M")] {
            let err = bandwidth_limit(input).err().unwrap_or_default();
            assert!(
                err.contains(&format!("did you mean {meant}?")),
                "{input}: {err}"
            );
        }
        let err = bandwidth_limit("fast").err().unwrap_or_default();
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn quantities_read_as_kubernetes_reads_them() {
        for (q, want) in [
            ("100Mi", 100 << 20),
            ("1k", 1000),
            ("1.5Gi", 3 << 29),
            ("2e3", 2000),
            ("2E3", 2000),
            ("512", 512),
            ("+512", 512),
            ("1024000m", 1024),
            ("1m", 1),
            ("0.5", 1),
            (".5k", 500),
            ("5.", 5),
            ("1e-3", 1),
            ("1e-400", 1),
            ("0e400", 0),
            ("-0", 0),
            ("000100", 100),
            ("100.000", 100),
            ("15Ei", 15 << 60),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_u64(q), Ok(want), "{q}");
        }
        for (q, err) in [
            ("fast", QuantityError::Malformed),
            ("", QuantityError::Malformed),
            (".", QuantityError::Malformed),
            ("1.2.3", QuantityError::Malformed),
            ("100MB", QuantityError::Malformed),
            ("1e", QuantityError::Malformed),
            ("1e1.5", QuantityError::Malformed),
            ("1Ki ", QuantityError::Malformed),
            ("-1Mi", QuantityError::Negative),
            ("16Ei", QuantityError::TooLarge),
            ("1e400", QuantityError::TooLarge),
            ("18446744073709551616", QuantityError::TooLarge),
            (
                "99999999999999999999999999999999999999999",
                QuantityError::TooLarge,
            ),
        ] {
            assert_eq!(parse_u64(q), Err(err), "{q}");
        }
    }

    #[test]
    fn bandwidth_limits_name_the_field_and_the_expected_form() {
        assert_eq!(bandwidth_limit("100Mi"), Ok(100 << 20));
        assert_eq!(bandwidth_limit("1024000m"), Ok(1024));
        for q in ["1e400", "16Ei", "2Ei", "12", "fast", "-1Mi"] {
            let e = bandwidth_limit(q).err().unwrap_or_default();
            assert!(
                e.starts_with("spec.transfer.bandwidthLimit") && e.contains("from 1Ki to 1Ei"),
                "{q}: {e}"
            );
        }
    }
}
