//! Integer request fields read as JSON Schema reads them: `15` and `15.0` are the same integer
//! (JSON has one number type, and clients in JavaScript or Python send `n: 2.0` when a value
//! went through a float). A number with a fractional part, or out of range, is still an error
//! naming the field.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// The largest float below which every integer is exact (2^53): beyond it `x.0` may not be
/// the integer the client wrote, so it is refused rather than guessed.
const EXACT: f64 = 9_007_199_254_740_992.0;

struct IntVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: TryFrom<i128>> Visitor<'de> for IntVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer in range of {}", std::any::type_name::<T>())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::try_from(i128::from(v)).map(Some).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        T::try_from(i128::from(v)).map(Some).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        if v.fract() != 0.0 || !v.is_finite() || v.abs() > EXACT {
            return Err(E::invalid_type(de::Unexpected::Float(v), &self));
        }
        // Exact: |v| <= 2^53 and integral.
        T::try_from(v as i128).map(Some).map_err(|_| E::invalid_value(de::Unexpected::Float(v), &self))
    }
}

/// `Option<u64>`: absent or `null` is `None`; `2` and `2.0` are `Some(2)`.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(IntVisitor::<u64>(std::marker::PhantomData))
}

/// `Option<i64>`, as [`opt_u64`].
pub fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(IntVisitor::<i64>(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "super::opt_u64")]
        n: Option<u64>,
        #[serde(default, deserialize_with = "super::opt_i64")]
        seed: Option<i64>,
    }

    fn parse(s: &str) -> Result<T, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn integral_numbers_in_any_spelling() {
        let t = parse(r#"{"n": 15.0, "seed": -3.0}"#).unwrap();
        assert_eq!((t.n, t.seed), (Some(15), Some(-3)));
        let t = parse(r#"{"n": 7, "seed": 9223372036854775807}"#).unwrap();
        assert_eq!((t.n, t.seed), (Some(7), Some(i64::MAX)));
        let t = parse(r#"{"n": null}"#).unwrap();
        assert_eq!((t.n, t.seed), (None, None));
        assert_eq!(parse("{}").unwrap().n, None);
        assert_eq!(parse(r#"{"n": 1e3}"#).unwrap().n, Some(1000));
    }

    #[test]
    fn fractions_negatives_and_huge_values_are_refused() {
        for bad in [
            r#"{"n": 1.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": -2.0}"#,
            r#"{"n": 1e300}"#,
            r#"{"n": "3"}"#,
            r#"{"n": true}"#,
            r#"{"seed": 18446744073709551615}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse(r#"{"n": 1.5}"#).unwrap_err().contains("floating point"), "the error names what was sent");
    }
}
