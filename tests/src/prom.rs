//! Prometheus text exposition parsing, enough to assert on counters and histograms.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{anyhow, Result};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`/`_sum`/`_count` suffixes as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Every sample, in exposition order.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parse the text format.
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).map_err(|e| anyhow!("metrics line {}: {e}: {line:?}", i + 1))?);
        }
        Ok(Scrape { samples })
    }

    /// Samples named `name` whose labels include every `(key, value)` in `want`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum of the matching samples (0 when none match).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.select(name, want).map(|s| s.value).sum::<f64>() + 0.0
    }

    /// Whether any sample of that name exists at all.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Lines of samples whose name starts with `prefix`, for failure messages.
    pub fn dump(&self, prefix: &str) -> String {
        self.samples.iter().filter(|s| s.name.starts_with(prefix)).map(|s| format!("{s}\n")).collect()
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{", self.name)?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            write!(f, "{}{k}={v:?}", if i > 0 { "," } else { "" })?;
        }
        write!(f, "}} {}", self.value)
    }
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices();
        let mut key = String::new();
        let end;
        loop {
            let (i, c) = chars.next().ok_or("unterminated labels")?;
            match c {
                '}' => {
                    end = i + 2;
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    let (_, q) = chars.next().ok_or("label without value")?;
                    if q != '"' {
                        return Err("label value not quoted".into());
                    }
                    let mut val = String::new();
                    loop {
                        let (_, c) = chars.next().ok_or("unterminated label value")?;
                        match c {
                            '"' => break,
                            '\\' => match chars.next().ok_or("dangling escape")?.1 {
                                'n' => val.push('\n'),
                                o => val.push(o),
                            },
                            o => val.push(o),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), val);
                }
                o => key.push(o),
            }
        }
        rest = &rest[end..];
    }
    let value_str = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value_str {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_escapes() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE a counter\na_total{agent=\"x\",sni=\"q\\\"z\"} 3\nb 1.5\nc_bucket{le=\"+Inf\"} 7 123\n",
        )
        .unwrap();
        assert_eq!(s.sum("a_total", &[("agent", "x")]), 3.0);
        assert_eq!(s.select("a_total", &[]).next().unwrap().labels["sni"], "q\"z");
        assert_eq!(s.sum("b", &[]), 1.5);
        assert_eq!(s.sum("c_bucket", &[("le", "+Inf")]), 7.0);
        assert_eq!(s.sum("a_total", &[("agent", "y")]), 0.0);
    }
}
