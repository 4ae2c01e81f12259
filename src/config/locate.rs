//! Turns an error into `file:line:column: key: message` (the promise of the config's
//! module doc) using toml_edit's spans: from a dotted key path to where it is written,
//! and from a parse error's byte offset back to the key that covers it.

use super::ConfigError;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Maps dotted key paths to `line:column` and back, using toml_edit's spans.
pub(super) struct Locator<'a> {
    text: &'a str,
    file: PathBuf,
    document: Option<toml_edit::Document<&'a str>>,
}

#[derive(Clone, Copy)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            segments.push(Segment::Key(name));
        }
        for index in rest.split('[') {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                segments.push(Segment::Index(i));
            }
        }
    }
    segments
}

impl<'a> Locator<'a> {
    pub(super) fn new(text: &'a str, file: &Path) -> Self {
        Locator {
            text,
            file: file.to_path_buf(),
            document: toml_edit::Document::parse(text).ok(),
        }
    }

    /// The file errors name.
    pub(super) fn file(&self) -> &Path {
        &self.file
    }

    pub(super) fn error(&self, key: &str, message: &str) -> ConfigError {
        let (line, column) = self.position(key);
        ConfigError::Invalid {
            file: self.file.clone(),
            line,
            column,
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    /// Where a key is written; its nearest written parent when it is missing.
    pub(super) fn position(&self, key: &str) -> (usize, usize) {
        let offset = self.span_of(key).map(|s| s.start).unwrap_or(0);
        self.line_col(offset)
    }

    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        let document = self.document.as_ref()?;
        let mut node = Node::Table(document.as_table());
        let mut best = None;
        for segment in split_path(key) {
            let next = match (node, segment) {
                (Node::Table(t), Segment::Key(name)) => {
                    best = t.key(name).and_then(|k| k.span()).or(best);
                    t.get(name).map(Node::from_item)
                }
                (Node::Value(toml_edit::Value::InlineTable(t)), Segment::Key(name)) => {
                    best = t.key(name).and_then(|k| k.span()).or(best);
                    t.get(name).map(Node::Value)
                }
                (Node::Tables(tables), Segment::Index(i)) => tables.get(i).map(Node::Table),
                (Node::Value(toml_edit::Value::Array(values)), Segment::Index(i)) => {
                    values.get(i).map(Node::Value)
                }
                _ => None,
            };
            let Some(next) = next else { break };
            // Values inside arrays have no key of their own: their own span is the anchor.
            match (next, segment) {
                (Node::Value(v), Segment::Index(_)) => best = v.span().or(best),
                (Node::Table(t), Segment::Index(_)) => best = t.span().or(best),
                _ => {}
            }
            node = next;
        }
        best
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The dotted path of the deepest key whose key or value covers `offset`.
    fn key_at(&self, offset: usize) -> Option<String> {
        key_in_table(self.document.as_ref()?.as_table(), offset, "")
    }

    pub(super) fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let offset = error.span().map(|s| s.start).unwrap_or(0);
        let (line, column) = self.line_col(offset);
        // A duplicate key makes toml_edit refuse the document too, so there is no tree
        // to search: the key is read from the text at the error's offset.
        // An empty name (`= 1`, a quoted `""` key) names nothing: every error names
        // a key, at worst the document (found by fuzz/ `config_parse`).
        let named = |key: &String| !key.is_empty() && !key.ends_with('.');
        let key = self
            .key_at(offset)
            .filter(named)
            .or_else(|| quoted_field(error.message()).filter(named))
            .or_else(|| written_key_at(self.text, offset).filter(named))
            .unwrap_or_else(|| "(document)".to_owned());
        ConfigError::Invalid {
            file: self.file.clone(),
            line,
            column,
            key,
            message: error.message().trim().to_owned(),
        }
    }
}

#[derive(Clone, Copy)]
enum Node<'d> {
    Table(&'d toml_edit::Table),
    Tables(&'d toml_edit::ArrayOfTables),
    Value(&'d toml_edit::Value),
    None,
}

impl<'d> Node<'d> {
    fn from_item(item: &'d toml_edit::Item) -> Self {
        match item {
            toml_edit::Item::Table(t) => Node::Table(t),
            toml_edit::Item::ArrayOfTables(t) => Node::Tables(t),
            toml_edit::Item::Value(v) => Node::Value(v),
            toml_edit::Item::None => Node::None,
        }
    }
}

fn join_key(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

fn covers(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.contains(&offset))
}

/// Depth-first: a table's own span covers only its header, so every child is searched.
fn key_in_table(table: &toml_edit::Table, offset: usize, parent: &str) -> Option<String> {
    for (name, item) in table.iter() {
        let path = join_key(parent, name);
        if covers(table.key(name).and_then(|k| k.span()), offset) {
            return Some(path);
        }
        let found = match item {
            toml_edit::Item::Table(t) => key_in_table(t, offset, &path)
                .or_else(|| covers(t.span(), offset).then(|| path.clone())),
            toml_edit::Item::ArrayOfTables(tables) => {
                tables.iter().enumerate().find_map(|(i, t)| {
                    let indexed = format!("{path}[{i}]");
                    key_in_table(t, offset, &indexed)
                        .or_else(|| covers(t.span(), offset).then_some(indexed))
                })
            }
            toml_edit::Item::Value(value) => key_in_value(value, offset, &path),
            toml_edit::Item::None => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn key_in_value(value: &toml_edit::Value, offset: usize, path: &str) -> Option<String> {
    match value {
        toml_edit::Value::Array(values) => values
            .iter()
            .enumerate()
            .find_map(|(i, v)| key_in_value(v, offset, &format!("{path}[{i}]")))
            .or_else(|| covers(value.span(), offset).then(|| path.to_owned())),
        toml_edit::Value::InlineTable(t) => t
            .iter()
            .find_map(|(name, v)| key_in_value(v, offset, &join_key(path, name)))
            .or_else(|| covers(value.span(), offset).then(|| path.to_owned())),
        _ => covers(value.span(), offset).then(|| path.to_owned()),
    }
}

/// The dotted key written at `offset` (a `key =` line or a `[table]` header), under
/// the table header above it, read from the text alone.
fn written_key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?.trim();
    let bare = |s: &str| s.trim().trim_matches('"').trim_matches('\'').to_owned();
    if let Some(header) = line.strip_prefix('[') {
        let name = header.trim_start_matches('[').split(']').next()?;
        return Some(bare(name));
    }
    let (name, _) = line.split_once('=')?;
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|h| h.trim_start_matches('[').split(']').next().map(bare));
    Some(match table {
        Some(table) => join_key(&table, &bare(name)),
        None => bare(name),
    })
}

fn quoted_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{VALID, invalid, parse};

    /// fuzz/seeds/config_parse/regression-empty-key: a syntax error on a line with
    /// no key name before its `=` named the key as "".
    #[test]
    fn a_syntax_error_without_a_key_name_names_the_document() {
        let (_, _, key, message) = invalid("=\r\0\x19se_");
        assert_eq!(key, "(document)", "{message}");
        // Inside a table, the table or the document, never `auth.` with no name.
        let (line, _, key, message) = invalid("[auth]\n = \r");
        assert!(matches!(&*key, "auth" | "(document)"), "{key:?}: {message}");
        assert_eq!(line, 2);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line_and_name() {
        let text = VALID.replace("leeway_seconds = 5", "leeway_seconds = 5\nleway = 3");
        let (line, _, key, message) = invalid(&text);
        assert_eq!(line, 10);
        assert_eq!(key, "auth.leway");
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let text = VALID.replace("leeway_seconds = 5", "leeway_seconds = \"5\"");
        let (line, _, key, _) = invalid(&text);
        assert_eq!((line, key.as_str()), (9, "auth.leeway_seconds"));
    }

    #[test]
    fn a_truncated_file_is_an_error_not_a_partial_config() {
        let cut = &VALID[..VALID.find("secrets = [\"new").unwrap() + 12];
        assert!(parse(cut).is_err());
        let cut = &VALID[..VALID.find("[[apps]]").unwrap()];
        let (_, _, key, _) = invalid(cut);
        assert_eq!(key, "apps");
    }

    #[test]
    fn a_duplicate_key_or_table_is_named() {
        let text = VALID.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nlisten = \"127.0.0.1:8081\"",
        );
        let (line, _, key, message) = invalid(&text);
        assert_eq!((line, key.as_str()), (4, "server.listen"), "{message}");
        assert!(message.contains("duplicate"), "{message}");

        let text = VALID.replace("[auth]", "[server]\nthreads = 2\n[auth]");
        let (_, _, key, message) = invalid(&text);
        assert_eq!(key, "server", "{message}");
    }
}
