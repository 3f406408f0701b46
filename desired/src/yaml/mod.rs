//! YAML with positions, and strict deserialization that reports every problem.
//!
//! drover's files (the desired-state repo, the agent config and its drop-ins) are parsed in two
//! steps: [`parse`] builds a tree of [`Node`]s that remember their file, line and column, then
//! [`from_node`] deserializes a typed value from it. Unlike a plain serde YAML parser, this:
//!
//! - reports **every** unknown field (with its line) instead of stopping at the first one;
//! - lets leaf types (versions, digests, durations, templates) report a bad value and go on
//!   (see [`report`]), so one run of `drover-agent validate` shows all of them;
//! - keeps plain scalars as text when the target is a string, so `version: 1.10` stays
//!   `"1.10"` instead of becoming the float `1.1`;
//! - rejects duplicate keys, which YAML parsers usually resolve silently (last one wins);
//! - is bounded: a file of at most [`MAX_FILE_BYTES`], nesting at most [`MAX_DEPTH`] deep, at
//!   most [`MAX_NODES`] nodes once aliases are expanded (an alias bomb is refused, not
//!   expanded), and a duplicate-key check linear in the size of each mapping.

mod de;

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

pub use de::{Spanned, from_node};

/// A position in a source file: file name, 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mark {
    /// The file, as shown to the user (relative to the repo or config dir where it helps).
    pub file: Arc<str>,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub col: u32,
}

impl Mark {
    /// The start of `file`, for problems that concern a whole file.
    pub fn file_start(file: &str) -> Mark {
        Mark {
            file: file.into(),
            line: 1,
            col: 1,
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// One problem found in a file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where the problem is.
    pub mark: Mark,
    /// What is wrong, and where possible how to fix it.
    pub message: String,
}

impl Problem {
    /// A problem at `mark`.
    pub fn new(mark: Mark, message: impl Into<String>) -> Problem {
        Problem {
            mark,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mark.file.is_empty() {
            // A problem of the whole configuration, not of one place in it.
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.mark, self.message)
        }
    }
}

/// Every problem found in a set of files, sorted by file and line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Sorts by position and drops exact duplicates.
    pub fn sorted(mut self) -> Problems {
        self.0.sort_by(|a, b| {
            (&a.mark.file, a.mark.line, a.mark.col, &a.message).cmp(&(
                &b.mark.file,
                b.mark.line,
                b.mark.col,
                &b.message,
            ))
        });
        self.0.dedup();
        self
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A YAML node with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub mark: Mark,
    /// The node's content.
    pub value: Value,
}

/// The content of a [`Node`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An empty value, `~` or `null`.
    Null,
    /// A scalar. `plain` is false for quoted and block scalars, which are always strings.
    Scalar {
        /// The scalar's text.
        text: String,
        /// Whether it was written without quotes (and so may be a number, bool or null).
        plain: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order (keys are unique: duplicates are a parse problem).
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A short description of the node's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The text of a scalar key, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Merges `over` into `self`: mappings merge key by key (recursively), anything else is
    /// replaced. Used for configuration drop-ins; positions of replaced values point at the
    /// drop-in that set them.
    pub fn merge(&mut self, over: Node) {
        match (&mut self.value, over.value) {
            (Value::Map(base), Value::Map(items)) => {
                for (k, v) in items {
                    match base.iter_mut().find(|(bk, _)| bk.as_str() == k.as_str()) {
                        Some((_, bv)) => bv.merge(v),
                        None => base.push((k, v)),
                    }
                }
            }
            (_, value) => {
                self.mark = over.mark;
                self.value = value;
            }
        }
    }
}

/// Largest YAML file read (drover's files are a few kilobytes).
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Deepest nesting of lists and mappings (aliases included).
pub const MAX_DEPTH: usize = 64;
/// Most nodes in one file, counting each alias as the nodes it stands for.
pub const MAX_NODES: usize = 100_000;

/// (nodes, depth) of a subtree.
fn measure(n: &Node) -> (usize, usize) {
    match &n.value {
        Value::Null | Value::Scalar { .. } => (1, 0),
        Value::Seq(items) => items.iter().fold((1, 1), |(c, d), i| {
            let (ic, id) = measure(i);
            (c + ic, d.max(id + 1))
        }),
        Value::Map(entries) => entries.iter().fold((1, 1), |(c, d), (k, v)| {
            let (kc, _) = measure(k);
            let (vc, vd) = measure(v);
            (c + kc + vc, d.max(vd + 1))
        }),
    }
}

/// Parses one YAML document from `text`; `file` names it in positions.
///
/// An empty document is [`Value::Null`]. Several documents, anchors used before they are
/// defined, non-scalar keys, duplicate keys and tags other than the standard ones are problems.
/// All structural problems are returned (a syntax error stops the parse at that point).
pub fn parse(file: &str, text: &str) -> Result<Node, Problems> {
    let file: Arc<str> = file.into();
    if text.len() > MAX_FILE_BYTES {
        return Err(Problems(vec![Problem::new(
            Mark::file_start(&file),
            format!(
                "file is {} bytes; drover reads YAML files of at most {MAX_FILE_BYTES} bytes",
                text.len()
            ),
        )]));
    }
    let mut builder = Builder {
        file: file.clone(),
        stack: Vec::new(),
        anchors: Vec::new(),
        docs: Vec::new(),
        problems: Vec::new(),
        nodes: 0,
        stopped: false,
    };
    let mut parser = Parser::new_from_str(text);
    // Event by event, so that a file over a limit stops the parse at once.
    while !builder.stopped {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((ev, m)) => builder.on_event(ev, m),
            Err(e) => {
                let m = e.marker();
                builder.problems.push(Problem::new(
                    Mark {
                        file: file.clone(),
                        line: m.line() as u32,
                        col: m.col() as u32 + 1,
                    },
                    format!("invalid YAML: {}", e.info()),
                ));
                break;
            }
        }
    }
    if builder.stopped {
        // What was built is incomplete; its problems (the limit) say why.
        builder.stack.clear();
        return Err(Problems(builder.problems).sorted());
    }
    if builder.docs.len() > 1 {
        let mark = builder.docs[1].mark.clone();
        builder.problems.push(Problem::new(
            mark,
            "more than one YAML document in this file; put one document per file",
        ));
    }
    if !builder.problems.is_empty() {
        return Err(Problems(builder.problems).sorted());
    }
    Ok(builder.docs.into_iter().next().unwrap_or(Node {
        mark: Mark::file_start(&file),
        value: Value::Null,
    }))
}

/// Collects events into nodes.
struct Builder {
    file: Arc<str>,
    /// Open sequences and mappings, with their anchor id.
    stack: Vec<(Node, usize)>,
    /// Anchored nodes, by anchor id, with their (nodes, depth).
    anchors: Vec<(usize, Node, (usize, usize))>,
    docs: Vec<Node>,
    problems: Vec<Problem>,
    /// Nodes made so far (aliases count as the nodes they copy).
    nodes: usize,
    /// A limit was hit: the parse stops.
    stopped: bool,
}

impl Builder {
    fn mark(&self, m: &Marker) -> Mark {
        Mark {
            file: self.file.clone(),
            line: m.line() as u32,
            col: m.col() as u32 + 1,
        }
    }

    /// Stops the parse with a problem at `m`.
    fn stop(&mut self, mark: Mark, message: String) {
        self.problems.push(Problem::new(mark, message));
        self.stopped = true;
    }

    /// Counts `n` more nodes; false (and stopped) when over the budget.
    fn count(&mut self, n: usize, mark: &Mark) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            self.stop(
                mark.clone(),
                format!(
                    "more than {MAX_NODES} values in this file (aliases count as what they repeat); is it an alias bomb?"
                ),
            );
            return false;
        }
        true
    }

    /// Adds a finished node to its parent (or as a document).
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let size = measure(&node);
            self.anchors.push((anchor, node.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some((parent, _)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => {
                    // Keys and values alternate; a pending key has a Null placeholder value
                    // whose mark is the key's own mark, flagged by `pending_key`.
                    if let Some((_, v)) = entries.last_mut().filter(|(_, v)| is_pending(v)) {
                        *v = node;
                    } else {
                        match &node.value {
                            Value::Scalar { .. } | Value::Null => {}
                            _ => self.problems.push(Problem::new(
                                node.mark.clone(),
                                "mapping keys must be plain strings",
                            )),
                        }
                        entries.push((node, pending()));
                    }
                }
                _ => unreachable!("only collections are on the stack"),
            },
        }
    }
}

/// The placeholder for the value of a key whose value has not been parsed yet.
fn pending() -> Node {
    Node {
        mark: Mark {
            file: "".into(),
            line: 0,
            col: 0,
        },
        value: Value::Null,
    }
}

fn is_pending(n: &Node) -> bool {
    n.mark.line == 0 && n.mark.file.is_empty()
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, m: Marker) {
        if self.stopped {
            return;
        }
        if matches!(
            ev,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        ) {
            let mark = self.mark(&m);
            if !self.count(1, &mark) {
                return;
            }
        }
        if matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..))
            && self.stack.len() >= MAX_DEPTH
        {
            let mark = self.mark(&m);
            self.stop(
                mark,
                format!("nested more than {MAX_DEPTH} levels deep; drover's files are flat"),
            );
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let mark = self.mark(&m);
                let mut plain = style == TScalarStyle::Plain;
                if let Some(tag) = tag {
                    match (tag.handle.as_str(), tag.suffix.as_str()) {
                        ("tag:yaml.org,2002:", "str") | ("!!", "str") => plain = false,
                        ("tag:yaml.org,2002:", _) | ("!!", _) => {}
                        (h, s) => self.problems.push(Problem::new(
                            mark.clone(),
                            format!("unsupported YAML tag `{h}{s}`"),
                        )),
                    }
                }
                let value = if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL")
                {
                    Value::Null
                } else {
                    Value::Scalar { text, plain }
                };
                self.push(Node { mark, value }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                let mark = self.mark(&m);
                self.stack.push((
                    Node {
                        mark,
                        value: Value::Seq(Vec::new()),
                    },
                    anchor,
                ));
            }
            Event::MappingStart(anchor, _) => {
                let mark = self.mark(&m);
                self.stack.push((
                    Node {
                        mark,
                        value: Value::Map(Vec::new()),
                    },
                    anchor,
                ));
            }
            Event::SequenceEnd => {
                if let Some((node, anchor)) = self.stack.pop() {
                    self.push(node, anchor);
                }
            }
            Event::MappingEnd => {
                if let Some((node, anchor)) = self.stack.pop() {
                    if let Value::Map(entries) = &node.value {
                        check_duplicate_keys(entries, &mut self.problems);
                    }
                    self.push(node, anchor);
                }
            }
            Event::Alias(id) => {
                let mark = self.mark(&m);
                let found = self
                    .anchors
                    .iter()
                    .rposition(|(a, _, _)| *a == id)
                    .map(|i| (i, self.anchors[i].2));
                match found {
                    Some((i, (nodes, depth))) => {
                        if self.stack.len() + depth > MAX_DEPTH {
                            self.stop(
                                mark,
                                format!(
                                    "this alias nests values more than {MAX_DEPTH} levels deep"
                                ),
                            );
                            return;
                        }
                        // Counted before it is copied: an alias bomb never expands.
                        if !self.count(nodes, &mark) {
                            return;
                        }
                        let mut node = self.anchors[i].1.clone();
                        node.mark = mark;
                        self.push(node, 0);
                    }
                    None => {
                        self.problems
                            .push(Problem::new(mark.clone(), "alias to an unknown anchor"));
                        self.push(
                            Node {
                                mark,
                                value: Value::Null,
                            },
                            0,
                        );
                    }
                }
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Linear in the number of keys (a file of many keys cannot make it slow).
fn check_duplicate_keys(entries: &[(Node, Node)], problems: &mut Vec<Problem>) {
    let mut seen: std::collections::HashMap<&str, &Node> =
        std::collections::HashMap::with_capacity(entries.len());
    for (k, _) in entries {
        let Some(key) = k.as_str() else { continue };
        if let Some(first) = seen.get(key).copied() {
            problems.push(Problem::new(
                k.mark.clone(),
                format!(
                    "duplicate key `{key}` (first defined at line {}); remove one of them",
                    first.mark.line
                ),
            ));
        } else {
            seen.insert(key, k);
        }
    }
}

thread_local! {
    /// Problems reported by leaf types while [`from_node`] runs on this thread.
    static SINK: RefCell<Option<Vec<Problem>>> = const { RefCell::new(None) };
}

/// Reports a bad value at `mark` and lets deserialization go on.
///
/// Returns `false` when no [`from_node`] is running on this thread (the value is being
/// deserialized from some other format): the caller must then fail with an error instead.
pub fn report(mark: &Mark, message: impl Into<String>) -> bool {
    SINK.with(|s| match s.borrow_mut().as_mut() {
        Some(problems) => {
            problems.push(Problem::new(mark.clone(), message));
            true
        }
        None => false,
    })
}

/// Whether a [`from_node`] is running on this thread (so [`Spanned`] values can be read).
pub fn is_collecting() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Runs `f` with a problem sink installed, returning what it reported.
fn collecting<T>(f: impl FnOnce() -> T) -> (T, Vec<Problem>) {
    let outer = SINK.with(|s| s.borrow_mut().replace(Vec::new()));
    let out = f();
    let problems = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), outer));
    (out, problems.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("f.yaml", "a: 1\nb:\n  c: x\n").unwrap();
        let Value::Map(entries) = &n.value else {
            panic!()
        };
        assert_eq!(entries[1].0.mark.line, 2);
        assert_eq!(entries[1].0.mark.col, 1);
        let Value::Map(inner) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(inner[0].1.mark.line, 3);
        assert_eq!(inner[0].1.mark.col, 6);
    }

    #[test]
    fn duplicate_keys_are_problems() {
        let e = parse("f.yaml", "a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].mark.line, 3);
        assert!(e.0[0].message.contains("duplicate key `a`"), "{e}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("f.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.to_string().starts_with("f.yaml:"), "{e}");
        assert!(e.to_string().contains("invalid YAML"), "{e}");
    }

    #[test]
    fn several_documents_are_a_problem() {
        let e = parse("f.yaml", "a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.to_string().contains("more than one YAML document"), "{e}");
    }

    #[test]
    fn aliases_resolve() {
        let n = parse("f.yaml", "a: &x {k: v}\nb: *x\n").unwrap();
        let Value::Map(entries) = &n.value else {
            panic!()
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }

    #[test]
    fn merge_overrides_leaves_and_keeps_siblings() {
        let mut base = parse("a.yaml", "x: 1\ny: {p: 1, q: 2}\n").unwrap();
        let over = parse("b.yaml", "y: {q: 3}\nz: 4\n").unwrap();
        base.merge(over);
        fn shape(n: &Node) -> String {
            match &n.value {
                Value::Null => "~".into(),
                Value::Scalar { text, .. } => text.clone(),
                Value::Seq(items) => format!(
                    "[{}]",
                    items.iter().map(shape).collect::<Vec<_>>().join(",")
                ),
                Value::Map(e) => format!(
                    "{{{}}}",
                    e.iter()
                        .map(|(k, v)| format!("{}:{}", shape(k), shape(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
        assert_eq!(shape(&base), "{x:1,y:{p:1,q:3},z:4}");
        let Value::Map(entries) = &base.value else {
            panic!()
        };
        let Value::Map(y) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(&*y[1].1.mark.file, "b.yaml");
    }

    #[test]
    fn empty_document_is_null() {
        assert_eq!(parse("f", "").unwrap().value, Value::Null);
        assert_eq!(parse("f", "# only a comment\n").unwrap().value, Value::Null);
    }

    /// The 359-byte "billion laughs" of the report: refused before anything expands.
    #[test]
    fn an_alias_bomb_is_refused_without_expanding() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse("bomb.yaml", &text).unwrap_err().to_string();
        assert!(e.contains("alias bomb"), "{e}");
        assert!(e.starts_with("bomb.yaml:"), "{e}");
        // A few aliases below the budget are fine.
        let n = parse("ok.yaml", "a: &a [1, 2]\nb: *a\nc: *a\n").unwrap();
        assert_eq!(measure(&n).0, 1 + 3 * 4);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        for text in [
            "- ".repeat(100_000) + "x\n",
            "[".repeat(100_000),
            "{a: ".repeat(100_000),
        ] {
            let e = parse("deep.yaml", &text).unwrap_err().to_string();
            // Ours, or the scanner's own limit for flow collections: both stop early.
            assert!(
                e.contains("nested more than 64 levels") || e.contains("recursion limit exceeded"),
                "{e}"
            );
        }
        // Depth through aliases is counted too.
        let mut text = "a: &a ".to_string() + &"[".repeat(40) + &"]".repeat(40) + "\n";
        text.push_str(&("b: ".to_string() + &"[".repeat(40) + "*a" + &"]".repeat(40) + "\n"));
        let e = parse("deep.yaml", &text).unwrap_err().to_string();
        assert!(e.contains("alias nests values more than 64"), "{e}");
        assert!(parse("ok.yaml", &("[".repeat(60) + &"]".repeat(60))).is_ok());
    }

    #[test]
    fn big_files_and_many_keys_are_bounded() {
        let e = parse("big.yaml", &"#".repeat(MAX_FILE_BYTES + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 1048576 bytes"), "{e}");
        // 45,000 distinct keys: the duplicate check is linear (it was quadratic: ~10^9
        // comparisons). Bounded generously: a slow machine takes milliseconds.
        let text: String = (0..45_000).map(|i| format!("k{i}: 1\n")).collect();
        let t0 = std::time::Instant::now();
        parse("keys.yaml", &text).unwrap();
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(3),
            "{:?}",
            t0.elapsed()
        );
        let text: String = (0..60_000).map(|i| format!("k{i}: 1\n")).collect();
        let e = parse("keys.yaml", &text).unwrap_err().to_string();
        assert!(e.contains("more than 100000 values"), "{e}");
        let e = parse("dup.yaml", "a: 1\nb: 2\na: 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dup.yaml:3:1: duplicate key `a` (first defined at line 1)"),
            "{e}"
        );
    }
}
