//! How the lists of several upstream servers become one list: the names clients see
//! (`tool_names: prefix | on_collision | never`), which server and original name each exposed
//! name routes back to, and which entries a collision hides. Pure functions, so the naming
//! rules are tested without servers.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::federation::ToolNaming;

/// One server's answer to a list method: its index in the federation and the items.
pub struct Listed {
    /// Server index.
    pub server: usize,
    /// Items (`tools`, `prompts`, `resources` entries) as the server sent them.
    pub items: Vec<Value>,
}

/// Where an exposed name goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Server index.
    pub server: usize,
    /// The server's own name for the item.
    pub original: String,
}

/// A merged list: items renamed for clients, the routes back, and the entries a collision hid.
#[derive(Debug, Default)]
pub struct Merged {
    /// Items in server order, `key` rewritten to the exposed name.
    pub items: Vec<Value>,
    /// Exposed name to server and original name.
    pub routes: HashMap<String, Route>,
    /// `(exposed name, hidden server index)` of every entry dropped because another server
    /// already owns the name.
    pub hidden: Vec<(String, usize)>,
}

/// Merge named items (tools, prompts): `key` holds the name. Items without a string name are
/// dropped (a client could not call them anyway).
pub fn merge_named(
    naming: ToolNaming,
    sep: &str,
    servers: &[impl AsRef<str>],
    lists: Vec<Listed>,
    key: &str,
) -> Merged {
    let mut count: HashMap<String, usize> = HashMap::new();
    if naming == ToolNaming::OnCollision {
        for l in &lists {
            let mut seen = std::collections::HashSet::new();
            for it in &l.items {
                if let Some(n) = it.get(key).and_then(Value::as_str) {
                    if seen.insert(n) {
                        *count.entry(n.to_string()).or_default() += 1;
                    }
                }
            }
        }
    }
    let mut out = Merged::default();
    for l in lists {
        let Some(server) = servers.get(l.server).map(AsRef::as_ref) else { continue };
        for mut it in l.items {
            let Some(original) = it.get(key).and_then(Value::as_str).map(str::to_string) else { continue };
            let prefixed = match naming {
                ToolNaming::Prefix => true,
                ToolNaming::OnCollision => count.get(&original).is_some_and(|n| *n > 1),
                ToolNaming::Never => false,
            };
            let exposed = if prefixed { format!("{server}{sep}{original}") } else { original.clone() };
            if out.routes.contains_key(&exposed) {
                out.hidden.push((exposed, l.server));
                continue;
            }
            if let Some(obj) = it.as_object_mut() {
                obj.insert(key.to_string(), Value::String(exposed.clone()));
            }
            out.routes.insert(exposed, Route { server: l.server, original });
            out.items.push(it);
        }
    }
    out
}

/// Merge resources or resource templates: URIs are global names, so they are never renamed;
/// a URI offered twice belongs to the server listed first.
pub fn merge_uris(lists: Vec<Listed>, key: &str) -> Merged {
    let mut out = Merged::default();
    for l in lists {
        for it in l.items {
            let Some(uri) = it.get(key).and_then(Value::as_str).map(str::to_string) else { continue };
            if out.routes.contains_key(&uri) {
                out.hidden.push((uri, l.server));
                continue;
            }
            out.routes.insert(uri.clone(), Route { server: l.server, original: uri });
            out.items.push(it);
        }
    }
    out
}

/// Under `tool_names: prefix` a name maps back without a listing: the part before the first
/// separator names the server (server names cannot contain it).
pub fn split_prefixed(sep: &str, servers: &[impl AsRef<str>], exposed: &str) -> Option<Route> {
    let (server, original) = exposed.split_once(sep)?;
    let idx = servers.iter().position(|s| s.as_ref() == server)?;
    (!original.is_empty()).then(|| Route { server: idx, original: original.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lists() -> Vec<Listed> {
        vec![
            Listed { server: 0, items: vec![json!({"name": "search", "x": 1}), json!({"name": "get_weather"})] },
            Listed { server: 1, items: vec![json!({"name": "search"}), json!({"name": "add"}), json!({"title": "?"})] },
        ]
    }

    fn names(m: &Merged) -> Vec<&str> {
        m.items.iter().map(|t| t["name"].as_str().unwrap()).collect()
    }

    #[test]
    fn prefix_names_everything_and_routes_back() {
        let m = merge_named(ToolNaming::Prefix, "__", &["web", "calc"], lists(), "name");
        assert_eq!(names(&m), ["web__search", "web__get_weather", "calc__search", "calc__add"]);
        assert_eq!(m.routes["calc__search"], Route { server: 1, original: "search".into() });
        assert_eq!(m.items[0]["x"], 1, "other fields kept");
        assert!(m.hidden.is_empty());
    }

    #[test]
    fn on_collision_prefixes_only_the_shared_names() {
        let m = merge_named(ToolNaming::OnCollision, ".", &["web", "calc"], lists(), "name");
        assert_eq!(names(&m), ["web.search", "get_weather", "calc.search", "add"]);
        assert_eq!(m.routes["add"].server, 1);
    }

    #[test]
    fn never_lets_the_first_server_keep_a_name() {
        let m = merge_named(ToolNaming::Never, "__", &["web", "calc"], lists(), "name");
        assert_eq!(names(&m), ["search", "get_weather", "add"]);
        assert_eq!(m.routes["search"].server, 0);
        assert_eq!(m.hidden, vec![("search".to_string(), 1)]);
    }

    #[test]
    fn a_server_listing_a_name_twice_keeps_one() {
        let l = vec![Listed { server: 0, items: vec![json!({"name": "a"}), json!({"name": "a"})] }];
        let m = merge_named(ToolNaming::OnCollision, "__", &["s"], l, "name");
        assert_eq!(names(&m), ["a"], "one server's duplicate is not a cross-server collision");
        assert_eq!(m.hidden.len(), 1);
    }

    #[test]
    fn uris_are_never_renamed() {
        let l = vec![
            Listed { server: 0, items: vec![json!({"uri": "file:///a"})] },
            Listed { server: 1, items: vec![json!({"uri": "file:///a"}), json!({"uri": "mem://b"})] },
        ];
        let m = merge_uris(l, "uri");
        assert_eq!(m.items.len(), 2);
        assert_eq!(m.routes["mem://b"].server, 1);
        assert_eq!(m.hidden, vec![("file:///a".to_string(), 1)]);
    }

    #[test]
    fn prefixed_names_split_on_the_first_separator() {
        let s = ["web", "calc"];
        assert_eq!(split_prefixed("__", &s, "calc__add__two"), Some(Route { server: 1, original: "add__two".into() }));
        assert_eq!(split_prefixed("__", &s, "other__add"), None);
        assert_eq!(split_prefixed("__", &s, "calc__"), None);
        assert_eq!(split_prefixed("__", &s, "add"), None);
    }
}
