//! A serde `Deserializer` over [`Node`]s that collects problems instead of stopping early.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess,
    SeqAccess, VariantAccess, Visitor,
};

use super::{Mark, Node, Problem, Value, collecting};

/// Deserializes a `T` from `node`.
///
/// Every problem found is appended to `problems`: unknown fields and values rejected by leaf
/// types (which carry on), plus at most one structural error (wrong type, missing field) that
/// stops the deserialization of this node. Returns the value only when no structural error
/// occurred; the caller must still check `problems` before trusting it.
pub fn from_node<T: DeserializeOwned>(node: &Node, problems: &mut Vec<Problem>) -> Option<T> {
    let (result, reported) = collecting(|| T::deserialize(NodeDe(node)));
    problems.extend(reported);
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(Problem::new(
                e.mark.unwrap_or_else(|| node.mark.clone()),
                e.msg,
            ));
            None
        }
    }
}

/// A deserialization error, positioned at the innermost node that produced it.
#[derive(Debug)]
pub struct Error {
    mark: Option<Mark>,
    msg: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mark {
            Some(m) => write!(f, "{m}: {}", self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            mark: None,
            msg: msg.to_string(),
        }
    }
}

impl Error {
    fn at(mark: &Mark, msg: impl Into<String>) -> Error {
        Error {
            mark: Some(mark.clone()),
            msg: msg.into(),
        }
    }
}

/// Gives an error with no position the position of `node`.
fn locate<T>(node: &Node, r: Result<T, Error>) -> Result<T, Error> {
    r.map_err(|mut e| {
        if e.mark.is_none() {
            e.mark = Some(node.mark.clone());
        }
        e
    })
}

/// The name under which [`Spanned`] asks for a node's position.
const SPANNED: &str = "$drover::yaml::Spanned";
const SPANNED_FIELDS: &[&str] = &["$file", "$line", "$col", "$value"];

/// A value with the position it was read from.
#[derive(Clone, Debug)]
pub struct Spanned<T> {
    /// Where the value is in its file.
    pub mark: Mark,
    /// The value.
    pub value: T,
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Spanned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Spanned<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value read from a drover YAML file")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (_, file): (String, String) = map.next_entry()?.ok_or_else(missing)?;
                let (_, line): (String, u32) = map.next_entry()?.ok_or_else(missing)?;
                let (_, col): (String, u32) = map.next_entry()?.ok_or_else(missing)?;
                let _: String = map.next_key()?.ok_or_else(missing)?;
                let value = map.next_value()?;
                Ok(Spanned {
                    mark: Mark {
                        file: file.into(),
                        line,
                        col,
                    },
                    value,
                })
            }
        }
        fn missing<E: de::Error>() -> E {
            E::custom("Spanned values can only be read from drover's YAML parser")
        }
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, V(PhantomData))
    }
}

/// The deserializer for one node.
#[derive(Clone, Copy)]
struct NodeDe<'a>(&'a Node);

impl<'a> NodeDe<'a> {
    fn scalar(&self, what: &str) -> Result<&'a str, Error> {
        match &self.0.value {
            Value::Scalar { text, .. } => Ok(text),
            _ => Err(Error::at(
                &self.0.mark,
                format!("expected {what}, found {}", self.0.kind()),
            )),
        }
    }

    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, Error> {
        let text = self.scalar(what)?;
        text.trim()
            .replace('_', "")
            .parse()
            .map_err(|_| Error::at(&self.0.mark, format!("expected {what}, found `{text}`")))
    }
}

macro_rules! number {
    ($($method:ident => $visit:ident : $ty:ty, $what:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            let n: $ty = self.parse($what)?;
            locate(self.0, v.$visit(n))
        }
    )*};
}

impl<'de, 'a> Deserializer<'de> for NodeDe<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let node = self.0;
        let r = match &node.value {
            Value::Null => v.visit_unit(),
            Value::Scalar { text, plain: false } => v.visit_str(text),
            Value::Scalar { text, plain: true } => {
                if let Some(b) = plain_bool(text) {
                    v.visit_bool(b)
                } else if let Ok(i) = text.parse::<i64>() {
                    v.visit_i64(i)
                } else if let Some(f) = plain_float(text) {
                    v.visit_f64(f)
                } else {
                    v.visit_str(text)
                }
            }
            Value::Seq(items) => v.visit_seq(Seq(items.iter())),
            Value::Map(entries) => v.visit_map(Map {
                entries: entries.iter().map(|(k, v)| (k, v)),
                value: None,
            }),
        };
        locate(node, r)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let text = self.scalar("true or false")?;
        match plain_bool(text) {
            Some(b) => locate(self.0, v.visit_bool(b)),
            None => Err(Error::at(
                &self.0.mark,
                format!("expected true or false, found `{text}`"),
            )),
        }
    }

    number! {
        deserialize_i8 => visit_i8: i8, "a small integer";
        deserialize_i16 => visit_i16: i16, "an integer";
        deserialize_i32 => visit_i32: i32, "an integer";
        deserialize_i64 => visit_i64: i64, "an integer";
        deserialize_u8 => visit_u8: u8, "a whole number from 0 to 255";
        deserialize_u16 => visit_u16: u16, "a whole number from 0 to 65535";
        deserialize_u32 => visit_u32: u32, "a whole number";
        deserialize_u64 => visit_u64: u64, "a whole number";
        deserialize_f32 => visit_f32: f32, "a number";
        deserialize_f64 => visit_f64: f64, "a number";
    }

    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let text = self.scalar("a string")?;
        locate(self.0, v.visit_str(text))
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.0.value {
            Value::Null => locate(self.0, v.visit_none()),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.0.value {
            Value::Null => locate(self.0, v.visit_unit()),
            _ => Err(Error::at(
                &self.0.mark,
                format!("expected nothing, found {}", self.0.kind()),
            )),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        locate(self.0, v.visit_newtype_struct(self))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Seq(items) => locate(self.0, v.visit_seq(Seq(items.iter()))),
            _ => Err(Error::at(
                &self.0.mark,
                format!("expected a list, found {}", self.0.kind()),
            )),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, Error> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Map(entries) => locate(
                self.0,
                v.visit_map(Map {
                    entries: entries.iter().map(|(k, v)| (k, v)),
                    value: None,
                }),
            ),
            _ => Err(Error::at(
                &self.0.mark,
                format!("expected a mapping, found {}", self.0.kind()),
            )),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        if name == SPANNED {
            return v.visit_map(SpannedAccess {
                node: self.0,
                step: 0,
            });
        }
        let Value::Map(entries) = &self.0.value else {
            return Err(Error::at(
                &self.0.mark,
                format!(
                    "expected a mapping with {}, found {}",
                    list(fields),
                    self.0.kind()
                ),
            ));
        };
        // Unknown keys are reported (all of them) and skipped, so the rest still parses.
        let mut known = Vec::with_capacity(entries.len());
        for (k, val) in entries {
            let problem = match k.as_str() {
                Some(key) if fields.contains(&key) => {
                    known.push((k, val));
                    continue;
                }
                Some(key) => {
                    let hint = closest(key, fields)
                        .map(|c| format!("did you mean `{c}`? "))
                        .unwrap_or_default();
                    format!("unknown field `{key}`; {hint}expected {}", list(fields))
                }
                None => "mapping keys must be plain strings".to_string(),
            };
            if !super::report(&k.mark, &problem) {
                return Err(Error::at(&k.mark, problem));
            }
        }
        locate(
            self.0,
            v.visit_map(Map {
                entries: known.into_iter(),
                value: None,
            }),
        )
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Scalar { text, .. } => locate(
                self.0,
                v.visit_enum(Enum {
                    variant: text,
                    mark: &self.0.mark,
                    value: None,
                }),
            ),
            Value::Map(entries) if entries.len() == 1 => {
                let (k, val) = &entries[0];
                let variant = k.as_str().unwrap_or_default();
                locate(
                    self.0,
                    v.visit_enum(Enum {
                        variant,
                        mark: &k.mark,
                        value: Some(val),
                    }),
                )
            }
            _ => Err(Error::at(
                &self.0.mark,
                format!(
                    "expected one of {}, found {}",
                    list(variants),
                    self.0.kind()
                ),
            )),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

/// `a`, `a` or `b`, `a`, `b` or `c`.
fn list(names: &[&str]) -> String {
    match names {
        [] => "nothing".into(),
        [one] => format!("`{one}`"),
        [init @ .., last] => format!(
            "{} or `{last}`",
            init.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The candidate within edit distance 2 of `word`, if any: a typo hint.
fn closest<'n>(word: &str, candidates: &[&'n str]) -> Option<&'n str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn plain_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn plain_float(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" => Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
        _ if text.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.') => {
            text.parse().ok()
        }
        _ => None,
    }
}

struct Seq<I>(I);

impl<'de, 'a, I: Iterator<Item = &'a Node>> SeqAccess<'de> for Seq<I> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.0.next() {
            Some(node) => locate(node, seed.deserialize(NodeDe(node))).map(Some),
            None => Ok(None),
        }
    }
}

struct Map<'a, I> {
    entries: I,
    value: Option<&'a Node>,
}

impl<'de, 'a, I> MapAccess<'de> for Map<'a, I>
where
    I: Iterator<Item = (&'a Node, &'a Node)>,
{
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((k, v)) => {
                self.value = Some(v);
                locate(k, seed.deserialize(NodeDe(k))).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        let node = self.value.take().expect("next_value after next_key");
        locate(node, seed.deserialize(NodeDe(node)))
    }
}

/// Serves a node's position and then the node itself to [`Spanned`].
struct SpannedAccess<'a> {
    node: &'a Node,
    step: usize,
}

impl<'de> MapAccess<'de> for SpannedAccess<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match SPANNED_FIELDS.get(self.step) {
            Some(name) => seed.deserialize(name.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        let mark = &self.node.mark;
        self.step += 1;
        match self.step {
            1 => seed.deserialize(mark.file.to_string().into_deserializer()),
            2 => seed.deserialize(mark.line.into_deserializer()),
            3 => seed.deserialize(mark.col.into_deserializer()),
            _ => seed.deserialize(NodeDe(self.node)),
        }
    }
}

struct Enum<'a> {
    variant: &'a str,
    mark: &'a Mark,
    value: Option<&'a Node>,
}

impl<'de, 'a> EnumAccess<'de> for Enum<'a> {
    type Error = Error;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let mark = self.mark;
        let v = seed
            .deserialize(self.variant.into_deserializer())
            .map_err(|e: Error| Error::at(mark, e.msg))?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Enum<'_> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        match self.value {
            None
            | Some(Node {
                value: Value::Null, ..
            }) => Ok(()),
            Some(n) => Err(Error::at(
                &n.mark,
                format!("`{}` takes no value", self.variant),
            )),
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        match self.value {
            Some(n) => seed.deserialize(NodeDe(n)),
            None => Err(Error::at(
                self.mark,
                format!("`{}` needs a value", self.variant),
            )),
        }
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, Error> {
        match self.value {
            Some(n) => NodeDe(n).deserialize_seq(v),
            None => Err(Error::at(
                self.mark,
                format!("`{}` needs a list", self.variant),
            )),
        }
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            Some(n) => NodeDe(n).deserialize_struct("", fields, v),
            None => Err(Error::at(
                self.mark,
                format!("`{}` needs a mapping", self.variant),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::yaml::parse;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        url: String,
        #[serde(default)]
        retries: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    enum Kind {
        Vm,
        Ecs,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // fields are checked through Debug-free asserts below
    struct Outer {
        name: String,
        version: String,
        kind: Kind,
        inner: Inner,
        list: Vec<u16>,
        #[serde(default)]
        map: BTreeMap<String, Spanned<String>>,
        flag: Option<bool>,
    }

    fn load<T: DeserializeOwned>(text: &str) -> (Option<T>, Vec<Problem>) {
        let node = parse("t.yaml", text).unwrap();
        let mut problems = Vec::new();
        let v = from_node(&node, &mut problems);
        (v, problems)
    }

    #[test]
    fn plain_scalars_stay_text_for_strings() {
        let (v, p) = load::<Outer>(
            "name: x\nversion: 1.10\nkind: vm\ninner: {url: u}\nlist: [1, 2]\nflag: true\n",
        );
        assert!(p.is_empty(), "{p:?}");
        let v = v.unwrap();
        assert_eq!(v.version, "1.10");
        assert_eq!(v.kind, Kind::Vm);
        assert_eq!(v.list, vec![1, 2]);
        assert_eq!(v.flag, Some(true));
    }

    #[test]
    fn every_unknown_field_is_reported_with_its_line() {
        let (v, p) = load::<Outer>(
            "name: x\nversoin: 1\nversion: 2\nkind: ecs\ninner:\n  url: u\n  retires: 3\nlist: []\n",
        );
        assert!(v.is_some());
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].mark.line, 2);
        assert!(p[0].message.contains("did you mean `version`"), "{}", p[0]);
        assert_eq!(p[1].mark.line, 7);
        assert!(p[1].message.contains("did you mean `retries`"), "{}", p[1]);
    }

    #[test]
    fn wrong_types_and_missing_fields_are_positioned() {
        let (v, p) =
            load::<Outer>("name: x\nversion: 1\nkind: vm\ninner: {url: u}\nlist: [1, x]\n");
        assert!(v.is_none());
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].mark.line, 5);
        assert!(p[0].message.contains("found `x`"), "{}", p[0]);

        let (_, p) = load::<Outer>("name: x\nkind: vm\ninner: {url: u}\nlist: []\n");
        assert!(p[0].message.contains("missing field `version`"), "{}", p[0]);
        assert_eq!(p[0].mark.line, 1);

        let (_, p) = load::<Outer>("name: x\nversion: 1\nkind: vn\ninner: {url: u}\nlist: []\n");
        assert_eq!(p[0].mark.line, 3);
        assert!(p[0].message.contains("unknown variant `vn`"), "{}", p[0]);

        let (_, p) = load::<Outer>("name: x\nversion: 1\nkind: vm\ninner: [a]\nlist: []\n");
        assert_eq!(p[0].mark.line, 4);
        assert!(p[0].message.contains("expected a mapping"), "{}", p[0]);
    }

    #[test]
    fn spanned_values_carry_their_position() {
        let (v, p) = load::<Outer>(
            "name: x\nversion: 1\nkind: vm\ninner: {url: u}\nlist: []\nmap:\n  a: one\n  b: two\n",
        );
        assert!(p.is_empty(), "{p:?}");
        let v = v.unwrap();
        assert_eq!(v.map["b"].mark.line, 8);
        assert_eq!(v.map["b"].value, "two");
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(closest("helth", &["health", "hooks"]), Some("health"));
        assert_eq!(closest("zzz", &["health"]), None);
    }
}
