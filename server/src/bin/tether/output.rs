//! What the commands print: JSON (`--json`), aligned tables, `key: value` lines, and the
//! formatting of cells, ages and sizes. Everything goes to stdout through here, so that a
//! closed pipe (`tether agents | head -1`) is an error to stop on, not a panic.

use std::io::{self, Write};

use serde_json::Value;

/// Prints `value` as pretty JSON.
pub fn json(value: &Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    line(&text)
}

/// Prints one line.
pub fn line(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Prints `text` as is.
pub fn raw(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Prints `key: value` lines, the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> io::Result<()> {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let text: String = pairs
        .iter()
        .map(|(k, v)| format!("{:<width$}  {v}\n", format!("{k}:")))
        .collect();
    raw(&text)
}

/// A table: a header row and aligned columns separated by two spaces.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as headers; missing ones print empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text; the last column is not padded.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell_of(r, i).chars().count())
                    .chain([self.headers.get(i).map_or(0, |h| h.len())])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut text = String::new();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let c = cell_of(row, i);
                if i + 1 == widths.len() {
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    let pad = width.saturating_sub(c.chars().count()) + 2;
                    line.push_str(&" ".repeat(pad));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    pub fn print(&self) -> io::Result<()> {
        raw(&self.render())
    }
}

/// Cell `i` of `row`, or "".
fn cell_of(row: &[String], i: usize) -> &str {
    row.get(i).map(String::as_str).unwrap_or("")
}

/// A JSON value as a table cell: strings as they are, `null` and empty arrays as `-`, arrays
/// joined with commas, anything else as JSON.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Milliseconds since the Unix epoch, now.
pub use tether_shared::clock::now_unix_ms;

/// How long before `now_ms` the time `unix_ms` was: `12s ago`, `5m ago`, `3h ago`, `2d ago`;
/// `-` for none.
pub fn ago(unix_ms: Option<u64>, now_ms: u64) -> String {
    match unix_ms {
        None | Some(0) => "-".to_owned(),
        Some(then) => format!("{} ago", duration(now_ms.saturating_sub(then))),
    }
}

/// A duration in milliseconds, in its largest whole unit.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("?"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let mut t = Table::new(&["NAME", "STATUS", "TAGS"]);
        t.row(vec!["web-1".into(), "online".into(), "web,eu".into()]);
        t.row(vec!["db".into(), "offline".into(), "-".into()]);
        assert_eq!(
            t.render(),
            "NAME   STATUS   TAGS\nweb-1  online   web,eu\ndb     offline  -\n"
        );
    }

    #[test]
    fn cells_ages_and_sizes_read_well() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!([])), "-");
        assert_eq!(cell(&json!(["a", "b"])), "a,b");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(ago(None, 5000), "-");
        assert_eq!(ago(Some(1000), 13_500), "12s ago");
        assert_eq!(ago(Some(0), 13_500), "-");
        assert_eq!(duration(250), "250ms");
        assert_eq!(duration(600_000), "10m");
        assert_eq!(duration(3 * 86_400_000), "3d");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
    }
}
