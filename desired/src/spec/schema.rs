//! JSON Schemas (draft 7, what editors' YAML support reads best) of `services/*.yaml` and
//! `environments/*.yaml`, generated from the very types the strict parser deserializes, so
//! they cannot drift from it: field names, which are required, enums, defaults and the doc
//! comments as descriptions. Leaf values (names, versions, durations, digests, paths) get the
//! patterns their parsers check.
//!
//! The schema is an editor's aid: what it cannot say (a file name matching its `service:`, a
//! template naming an unknown var, a pattern that compiles) `drover-agent validate` still
//! checks. The generated files are committed under `schema/` and shipped in the packages; a
//! test fails when they differ from what this module generates.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings, json_schema};

use super::leaf::{Account, Digest, Dur, Name, Pattern, RelPath, Version};
use super::{EcsStep, Environment, Hook, ServiceSpec, Template};
use crate::freeze::{Cron, Stamp, Zone};
use crate::yaml::Spanned;

/// The file names under `schema/` and what each describes.
pub const FILES: [(&str, &str); 2] = [
    ("service.schema.json", "services/*.yaml"),
    ("environment.schema.json", "environments/*.yaml"),
];

/// The schema of `services/<service>.yaml`.
pub fn service() -> serde_json::Value {
    root::<ServiceSpec>("drover service definition (services/<service>.yaml, format v1)")
}

/// The schema of `environments/<env>.yaml`.
pub fn environment() -> serde_json::Value {
    root::<Environment>("drover environment (environments/<env>.yaml, format v1)")
}

/// The schema of a file under `schema/` by name ([`FILES`]).
pub fn by_file(name: &str) -> Option<serde_json::Value> {
    match name {
        "service.schema.json" => Some(service()),
        "environment.schema.json" => Some(environment()),
        _ => None,
    }
}

fn root<T: JsonSchema>(title: &str) -> serde_json::Value {
    let mut schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<T>();
    schema.insert("title".into(), title.into());
    schema.insert(
        "$comment".into(),
        "Generated from drover's parser types (drover-desired spec::schema); do not edit. `drover-agent validate` checks what a schema cannot."
            .into(),
    );
    schema.to_value()
}

/// A string leaf: its name, description and pattern; `numbers` when YAML may write it as a
/// plain number (which the parser reads as its text).
fn leaf(description: &str, pattern: Option<&str>, numbers: bool) -> Schema {
    let mut s = if numbers {
        json_schema!({ "type": ["string", "number"] })
    } else {
        json_schema!({ "type": "string" })
    };
    s.insert("description".into(), description.into());
    if let Some(p) = pattern {
        s.insert("pattern".into(), p.into());
    }
    s
}

macro_rules! leaf_schema {
    ($t:ty, $name:literal, $desc:literal, $pattern:expr, $numbers:literal) => {
        impl JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                leaf($desc, $pattern, $numbers)
            }
        }
    };
}

leaf_schema!(
    Name,
    "Name",
    "A name: lowercase letters, digits, `-` and `_`, starting with a letter or digit, at most 63 characters.",
    Some("^[a-z0-9][a-z0-9_-]{0,62}$"),
    false
);
leaf_schema!(
    Version,
    "Version",
    "A version: letters, digits, `.`, `_`, `+` and `-`, starting with a letter or digit, at most 128 characters (e.g. 1.4.2).",
    Some("^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"),
    true
);
leaf_schema!(
    Account,
    "Account",
    "A user or group on the host: an account name (lowercase letters, digits, `-`, `_`, at most 32) or a numeric id.",
    Some("^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$"),
    true
);
leaf_schema!(
    Pattern,
    "Pattern",
    "A regular expression (Rust regex syntax), 1 to 1,000 characters, that does not match the empty string.",
    Some("^.{1,1000}$"),
    false
);
leaf_schema!(
    Digest,
    "Sha256",
    "The artifact's SHA-256: 64 hex digits as printed by `sha256sum FILE` (a `sha256:` prefix is allowed).",
    Some("^(sha256:)?[0-9a-fA-F]{64}$"),
    true
);
leaf_schema!(
    Dur,
    "Duration",
    "A duration: numbers with units ms, s, m, h, d (e.g. 500ms, 30s, 5m, 1h30m).",
    Some("^\\s*([0-9]+(ms|s|m|h|d))+\\s*$"),
    false
);
leaf_schema!(
    Stamp,
    "Time",
    "A time in RFC 3339 with its offset, e.g. 2026-12-24T00:00:00Z or 2026-12-24T00:00:00+01:00.",
    Some(
        "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]+)?)?([Zz]|[+-][0-9]{2}:?[0-9]{2})$"
    ),
    false
);
leaf_schema!(
    Cron,
    "Cron",
    "Five cron fields: minute hour day-of-month month day-of-week (e.g. \"0 18 * * FRI\"); `*`, ranges, steps, lists, month and day names.",
    Some("^\\s*\\S+(\\s+\\S+){4}\\s*$"),
    false
);
leaf_schema!(
    Zone,
    "TimeZone",
    "An IANA time zone name, e.g. UTC, Europe/Berlin, America/New_York.",
    None,
    false
);
leaf_schema!(
    RelPath,
    "RelativePath",
    "A path relative to the release directory; never absolute, never `..`.",
    Some("^(?!/)(?!(.*/)?\\.\\.(/|$)).+$"),
    false
);
leaf_schema!(
    Template,
    "Template",
    "Text with `{name}` placeholders: `{version}`, `{service}`, `{environment}`, `{host}`, the host's vars and, in template files, `{env.NAME}`.",
    None,
    true
);

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

impl JsonSchema for Hook {
    fn schema_name() -> Cow<'static, str> {
        "Hook".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let path = generator.subschema_for::<Template>();
        let dur = generator.subschema_for::<Dur>();
        json_schema!({
            "description": "A hook: a program in the release (`bin/drain`), or `{ command: [program, args...], timeout: 60s }`.",
            "oneOf": [
                path.clone(),
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["command"],
                    "properties": {
                        "command": {
                            "description": "Program and arguments; the program is relative to the release.",
                            "type": "array",
                            "items": path,
                        },
                        "timeout": {
                            "description": "Killed (with its process group) after this long. Default 60s.",
                            "default": "1m",
                            "allOf": [dur],
                        }
                    }
                }
            ]
        })
    }
}

impl JsonSchema for EcsStep {
    fn schema_name() -> Cow<'static, str> {
        "EcsStep".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let dur = generator.subschema_for::<Dur>();
        let weight = json_schema!({
            "description": "Percent of traffic on the new version.",
            "type": "integer",
            "minimum": 1,
            "maximum": 100,
        });
        json_schema!({
            "description": "A traffic step: a percentage (10), or `{ weight: 10, wait: 5m, approval: true }`.",
            "oneOf": [
                weight.clone(),
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["weight"],
                    "properties": {
                        "weight": weight,
                        "wait": {
                            "description": "Bake time at this step (at most 24h). Default `ecs.step_wait`.",
                            "allOf": [dur],
                        },
                        "approval": {
                            "description": "Whether the step, once baked and verified, waits for an approval (`drover approve`) before traffic moves on; a rejection or no answer within `approval.timeout` puts traffic back on the old side. Default false.",
                            "type": "boolean",
                            "default": false,
                        }
                    }
                }
            ]
        })
    }
}
