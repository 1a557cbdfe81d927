//! The README's configuration reference, generated from the JSON schema of [`Config`]: every key
//! with its type, default and meaning comes from the typed config itself (field doc comments
//! and `Default` impls), so the documentation cannot drift from what `tollgate check` accepts.
//! `tollgate schema --markdown` prints it; `cargo xtask docs` writes it into the README (through
//! the unit test below, run with `TOLLGATE_UPDATE_README=1`), and that test fails while the
//! README's copy differs.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::Config;

/// Marker lines around the generated table in the README.
pub const BEGIN: &str =
    "<!-- BEGIN config-reference: generated from the schema by `cargo xtask docs`; edit the doc comments, not this table -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- END config-reference -->";

/// Nesting followed before a key is shown as a whole (the config is not recursive; this only
/// guards the walk).
const MAX_DEPTH: usize = 8;

/// One row of the reference.
struct Row {
    key: String,
    ty: String,
    default: String,
    meaning: String,
}

/// The reference table (markdown, one row per key, parents before their fields).
pub fn markdown() -> String {
    let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap_or(Value::Null);
    let defs = schema.get("$defs").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut rows = Vec::new();
    let walker = Walker { defs: &defs };
    walker.object_fields(&schema, "", &mut rows, 0);
    let mut out = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(out, "| `{}` | {} | {} | {} |", r.key, r.ty, r.default, r.meaning);
    }
    out
}

/// Replace the generated block of `readme` (between [`BEGIN`] and [`END`]) with `table`;
/// `None` when the markers are missing or out of order.
pub fn splice(readme: &str, table: &str) -> Option<String> {
    let start = readme.find(BEGIN)? + BEGIN.len();
    let end = start + readme[start..].find(END)?;
    Some(format!("{}\n{}{}", &readme[..start], table, &readme[end..]))
}

/// The generated block currently in `readme`.
pub fn current(readme: &str) -> Option<&str> {
    let start = readme.find(BEGIN)? + BEGIN.len();
    let end = start + readme[start..].find(END)?;
    Some(readme[start..end].trim_start_matches('\n'))
}

struct Walker<'a> {
    defs: &'a Map<String, Value>,
}

impl Walker<'_> {
    /// Follow `$ref` (and `anyOf: [X, null]`, an `Option<X>`) to the schema that says what a
    /// value is.
    fn resolve<'v>(&'v self, mut node: &'v Value) -> &'v Value {
        for _ in 0..MAX_DEPTH {
            if let Some(name) = node.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
                match self.defs.get(name) {
                    Some(d) => node = d,
                    None => return node,
                }
                continue;
            }
            if let Some(alts) = node.get("anyOf").and_then(Value::as_array) {
                let non_null: Vec<&Value> = alts.iter().filter(|a| a.get("type") != Some(&"null".into())).collect();
                if let [one] = non_null.as_slice() {
                    node = one;
                    continue;
                }
            }
            return node;
        }
        node
    }

    /// Rows for every property of the object schema `node` under `prefix`.
    fn object_fields(&self, node: &Value, prefix: &str, rows: &mut Vec<Row>, depth: usize) {
        let node = self.resolve(node);
        let Some(props) = node.get("properties").and_then(Value::as_object) else { return };
        let required: Vec<&str> =
            node.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        for (name, prop) in props {
            // The tag of a tagged enum variant is shown in the variant's key.
            if prop.get("const").is_some() {
                continue;
            }
            let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            self.value(prop, &key, required.contains(&name.as_str()), rows, depth + 1);
        }
    }

    /// The row of `key` (schema `prop`) and, for objects and lists of objects, their fields.
    fn value(&self, prop: &Value, key: &str, required: bool, rows: &mut Vec<Row>, depth: usize) {
        let target = self.resolve(prop);
        let meaning = description(prop).or_else(|| description(target)).unwrap_or_default();
        let default = match prop.get("default") {
            Some(d) => show_default(d),
            None if required => "required".into(),
            None => "–".into(),
        };
        let mut ty = self.type_name(prop);
        // Durations are humantime strings in the schema; a default that parses as one says so.
        let is_duration =
            prop.get("default").and_then(Value::as_str).is_some_and(|d| humantime::parse_duration(d).is_ok());
        if is_duration && ty.starts_with("string") {
            ty = ty.replacen("string", "duration", 1);
        }
        rows.push(Row { key: key.to_string(), ty, default, meaning: cell(&meaning) });
        if depth >= MAX_DEPTH {
            return;
        }
        if target.get("properties").is_some() {
            self.object_fields(target, key, rows, depth);
        } else if let Some(items) = self.list_items(target) {
            let item = self.resolve(items);
            if item.get("properties").is_some() {
                self.object_fields(item, &format!("{key}[]"), rows, depth);
            } else if let Some(variants) = item.get("oneOf").and_then(Value::as_array) {
                self.variants(variants, &format!("{key}[]"), rows, depth);
            }
        } else if let Some(variants) = target.get("oneOf").and_then(Value::as_array) {
            self.variants(variants, key, rows, depth);
        }
    }

    /// Fields of the object variants of a tagged enum, keyed `prefix{tag=value}.field`.
    fn variants(&self, variants: &[Value], prefix: &str, rows: &mut Vec<Row>, depth: usize) {
        for v in variants {
            let v = self.resolve(v);
            let Some(props) = v.get("properties").and_then(Value::as_object) else { continue };
            let tag =
                props.iter().find_map(|(k, p)| p.get("const").and_then(Value::as_str).map(|c| format!("{k}={c}")));
            let key = match tag {
                Some(t) => format!("{prefix}{{{t}}}"),
                None => prefix.to_string(),
            };
            self.object_fields(v, &key, rows, depth);
        }
    }

    fn list_items<'v>(&self, node: &'v Value) -> Option<&'v Value> {
        let is_array = match node.get("type") {
            Some(Value::String(t)) => t == "array",
            Some(Value::Array(ts)) => ts.iter().any(|t| t == "array"),
            _ => false,
        };
        is_array.then(|| node.get("items")).flatten()
    }

    /// A short type: `string`, `integer`, `list of X`, `a \| b` for string enums, the
    /// definition's name for objects.
    fn type_name(&self, prop: &Value) -> String {
        let def_name = |n: &Value| {
            n.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")).map(str::to_string)
        };
        let mut node = prop;
        let mut optional = false;
        if let Some(alts) = prop.get("anyOf").and_then(Value::as_array) {
            let non_null: Vec<&Value> = alts.iter().filter(|a| a.get("type") != Some(&"null".into())).collect();
            optional = non_null.len() < alts.len();
            if let [one] = non_null.as_slice() {
                node = one;
            }
        }
        let target = self.resolve(node);
        let base = if let Some(values) = enum_values(target) {
            values.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(" \\| ")
        } else if let Some(items) = self.list_items(target) {
            format!("list of {}", self.type_name(items))
        } else if target.get("properties").is_some() || target.get("oneOf").is_some() {
            def_name(node).map(|n| n.trim_end_matches("Config").to_string()).unwrap_or_else(|| "object".into())
        } else {
            match target.get("type") {
                Some(Value::String(t)) => t.clone(),
                Some(Value::Array(ts)) => {
                    optional |= ts.iter().any(|t| t == "null");
                    ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect::<Vec<_>>().join(" \\| ")
                }
                _ => "any".into(),
            }
        };
        if optional {
            format!("{base} (optional)")
        } else {
            base
        }
    }
}

/// The values of a string enum (`enum: [...]` or `oneOf` of `const`s).
fn enum_values(node: &Value) -> Option<Vec<String>> {
    if let Some(e) = node.get("enum").and_then(Value::as_array) {
        return Some(e.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).collect());
    }
    let variants = node.get("oneOf").and_then(Value::as_array)?;
    variants
        .iter()
        .map(|v| {
            v.get("const").and_then(Value::as_str).map(str::to_string).or_else(|| {
                v.get("enum")
                    .and_then(Value::as_array)
                    .and_then(|e| e.first())
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
            })
        })
        .collect()
}

fn description(node: &Value) -> Option<String> {
    node.get("description").and_then(Value::as_str).map(str::to_string)
}

/// A default as written in YAML: strings bare, empty lists `[]`, objects `see fields`.
fn show_default(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => format!("`{}`", s.replace('|', "\\|")),
        Value::Object(m) if m.is_empty() => "`{}`".into(),
        Value::Object(_) => "see fields".into(),
        Value::Array(a) if a.is_empty() => "`[]`".into(),
        other => {
            let s = other.to_string();
            if s.len() > 80 {
                "see fields".into()
            } else {
                format!("`{}`", s.replace('|', "\\|"))
            }
        }
    }
}

/// Doc text as one table cell: paragraphs joined, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readme() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// With `TOLLGATE_UPDATE_README=1` (what `cargo xtask docs` sets) the README's block is
    /// rewritten instead of compared.
    #[test]
    fn readme_config_reference_is_generated_from_the_schema() {
        let readme = readme();
        let current = current(&readme).expect("README has the config-reference markers");
        let want = markdown();
        if std::env::var_os("TOLLGATE_UPDATE_README").is_some() {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
            let updated = splice(&readme, &want).expect("markers");
            std::fs::write(&path, updated).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            return;
        }
        if current != want {
            let diff: Vec<String> = want
                .lines()
                .filter(|l| !current.lines().any(|c| c == *l))
                .map(|l| format!("missing: {l}"))
                .chain(current.lines().filter(|l| !want.lines().any(|w| w == *l)).map(|l| format!("stale: {l}")))
                .take(20)
                .collect();
            panic!("README config reference is out of date: run `cargo xtask docs`. Differences:\n{}", diff.join("\n"));
        }
    }

    #[test]
    fn every_key_has_a_meaning_and_known_keys_are_listed() {
        let table = markdown();
        for line in table.lines().skip(2) {
            let cells: Vec<&str> = line.split(" | ").collect();
            assert!(cells.len() >= 4 && !cells[3].trim_end_matches(" |").trim().is_empty(), "no meaning: {line}");
        }
        for key in [
            "`capture.bpffs_dir`",
            "`rate_limits.redis.timeout`",
            "`rate_limits.redis.probe_interval`",
            "`rate_limits.redis.key_prefix`",
            "`limits.max_request_body_bytes`",
            "`tls.leaf_validity`",
            "`routes[].log_payloads.max_bytes`",
        ] {
            assert!(table.contains(&format!("| {key} |")), "{key} missing from the reference");
        }
        assert!(table.contains("| `limits.max_request_body_bytes` | integer | `8388608` |"), "{table}");
    }

    #[test]
    fn splice_replaces_only_the_block() {
        let doc = format!("intro\n{BEGIN}\nold\n{END}\noutro\n");
        let out = splice(&doc, "new\n").expect("markers");
        assert_eq!(out, format!("intro\n{BEGIN}\nnew\n{END}\noutro\n"));
        assert_eq!(current(&out), Some("new\n"));
        assert!(splice("no markers", "x").is_none());
    }
}
