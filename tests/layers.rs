//! The module graph (issue #24): nodes are the top-level modules of `src/` (`main.rs` and
//! `lib.rs` are roots, not nodes); every `crate::<module>` path outside `#[cfg(test)]` items
//! is an edge, `use crate::{a, b::c}` groups and inline paths included, comments and string
//! literals not. The test fails on any cycle and on any edge the layer table in
//! ARCHITECTURE.md (the fenced `layers` block) does not allow, so the document and the code
//! cannot drift apart. A pure scan of the files: no binary, no build of the crate needed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// One use of another module: where it is, for the failure message.
#[derive(Debug, Clone)]
struct Site {
    file: String,
    line: usize,
}

type Edges = BTreeMap<(String, String), Vec<Site>>;

/// Replaces comments and the contents of string and char literals with spaces (newlines
/// kept, so line numbers hold), so that neither a `crate::` in a doc comment nor a brace in
/// a string counts.
fn blank_comments_and_literals(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out: Vec<char> = Vec::with_capacity(b.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0usize;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push(' ');
                    out.push(' ');
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push(' ');
                    out.push(' ');
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && next == Some('r')))
            && !prev_is_ident(&b, i)
            && raw_string_start(&b, if c == 'b' { i + 1 } else { i }).is_some()
        {
            let start = if c == 'b' { i + 1 } else { i };
            let hashes = raw_string_start(&b, start).unwrap();
            // r##"...."##
            let open_len = start - i + 1 + hashes + 1;
            out.extend(std::iter::repeat_n(' ', open_len));
            i += open_len;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == '"' && (0..hashes).all(|k| b.get(i + 1 + k) == Some(&'#')) {
                    out.extend(std::iter::repeat_n(' ', hashes + 1));
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(b[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' && i + 1 < b.len() {
                    out.push(' ');
                    i += 1;
                }
                out.push(blank(b[i]));
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}', '\'') or a lifetime ('a).
            if next == Some('\\') {
                out.push(' ');
                i += 1;
                while i < b.len() && b[i] != '\'' {
                    if b[i] == '\\' {
                        out.push(' ');
                        i += 1;
                    }
                    out.push(' ');
                    i += 1;
                }
                out.push(' ');
                i += 1;
            } else if b.get(i + 2) == Some(&'\'') {
                out.extend([' ', ' ', ' ']);
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out.into_iter().collect()
}

fn prev_is_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// At `b[i] == 'r'`: the number of `#`s of a raw string starting here, if one does.
fn raw_string_start(b: &[char], i: usize) -> Option<usize> {
    if b.get(i) != Some(&'r') {
        return None;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&'#') {
        j += 1;
    }
    (b.get(j) == Some(&'"')).then_some(j - i - 1)
}

/// Blanks every item carrying `#[cfg(test)]` (a `mod tests { … }`, a function, a `use …;`):
/// from the attribute to the end of the item's braces, or its `;` if it has none first.
fn blank_cfg_test(code: &str) -> String {
    let mut b: Vec<char> = code.chars().collect();
    let pat: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + pat.len() <= b.len() {
        if b[i..i + pat.len()] != pat[..] {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + pat.len();
        let mut depth = 0usize;
        let mut end = b.len();
        while j < b.len() {
            match b[j] {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        for c in &mut b[start..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = end;
    }
    b.into_iter().collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The first segments of every `crate::` path in `code` (blanked already), with their line:
/// `crate::a::b` gives `a`; `crate::{a, b::c, self}` gives `a` and `b`.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let b: Vec<char> = code.chars().collect();
    let pat: Vec<char> = "crate".chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    let line_at = |k: usize| b[..k].iter().filter(|&&c| c == '\n').count() + 1;
    while i + pat.len() <= b.len() {
        if b[i..i + pat.len()] != pat[..] || (i > 0 && is_ident(b[i - 1])) {
            i += 1;
            continue;
        }
        let mut j = i + pat.len();
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        if !(b.get(j) == Some(&':') && b.get(j + 1) == Some(&':')) {
            i += 1;
            continue;
        }
        j += 2;
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        if b.get(j) == Some(&'{') {
            // A group: the first segment of every top-level entry.
            let mut depth = 0usize;
            let mut at_entry_start = true;
            let mut k = j;
            while k < b.len() {
                let c = b[k];
                if c == '{' {
                    depth += 1;
                    at_entry_start = depth == 1;
                    k += 1;
                } else if c == '}' {
                    depth -= 1;
                    k += 1;
                    if depth == 0 {
                        break;
                    }
                } else if c == ',' && depth == 1 {
                    at_entry_start = true;
                    k += 1;
                } else if c.is_whitespace() {
                    k += 1;
                } else if at_entry_start && depth == 1 && is_ident(c) {
                    let s = k;
                    while k < b.len() && is_ident(b[k]) {
                        k += 1;
                    }
                    let name: String = b[s..k].iter().collect();
                    if name != "self" {
                        found.push((name, line_at(s)));
                    }
                    at_entry_start = false;
                } else {
                    at_entry_start = false;
                    k += 1;
                }
            }
            i = k;
        } else {
            let s = j;
            while j < b.len() && is_ident(b[j]) {
                j += 1;
            }
            if j > s {
                let name: String = b[s..j].iter().collect();
                // `crate::name!(…)`: an exported macro, named after the module defining it
                // by `scan` (`!name` here).
                let name = if b.get(j) == Some(&'!') { format!("!{name}") } else { name };
                found.push((name, line_at(s)));
            }
            i = j.max(i + 1);
        }
    }
    found
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules of `src` (directories and `.rs` files, `main`/`lib` excluded) and
/// every edge between them with the places it is used.
/// The files of top-level module `node` of `src`: `node.rs` and everything under `node/`.
fn module_files(src: &Path, node: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let dir = src.join(node);
    if dir.is_dir() {
        rs_files(&dir, &mut files);
    }
    let file = src.join(format!("{node}.rs"));
    if file.is_file() {
        files.push(file);
    }
    files
}

fn scan(src: &Path) -> (BTreeSet<String>, Edges, Vec<String>) {
    let mut nodes = BTreeSet::new();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if (p.is_dir() || p.extension().is_some_and(|e| e == "rs")) && name != "main" && name != "lib" {
            nodes.insert(name);
        }
    }
    // Exported macros (`#[macro_export] macro_rules! name`) and the module defining each.
    let mut macros = BTreeMap::new();
    for node in &nodes {
        for f in module_files(src, node) {
            let text = std::fs::read_to_string(&f).unwrap();
            for part in text.split("#[macro_export]").skip(1) {
                if let Some(rest) = part.trim_start().strip_prefix("macro_rules!") {
                    let name: String = rest.trim_start().chars().take_while(|&c| is_ident(c)).collect();
                    macros.insert(format!("!{name}"), node.clone());
                }
            }
        }
    }
    let mut edges = Edges::new();
    let mut unknown = Vec::new();
    for node in &nodes {
        for f in module_files(src, node) {
            let text = std::fs::read_to_string(&f).unwrap();
            let code = blank_cfg_test(&blank_comments_and_literals(&text));
            let rel = f.strip_prefix(src.parent().unwrap()).unwrap().display().to_string();
            for (to, line) in crate_paths(&code) {
                let to = macros.get(&to).cloned().unwrap_or(to);
                if &to == node {
                    continue;
                }
                if !nodes.contains(&to) {
                    unknown.push(format!("{rel}:{line}: crate::{to} is not a top-level module"));
                    continue;
                }
                edges.entry((node.clone(), to)).or_default().push(Site { file: rel.clone(), line });
            }
        }
    }
    (nodes, edges, unknown)
}

/// The layer table: the fenced ```` ```layers ```` block of ARCHITECTURE.md, one
/// `module: allowed, deps` line per module (a module may appear on several lines; `#`
/// starts a comment). Lines between `# BEGIN temporary` and `# END temporary` are allowances
/// that are meant to go; they count, and are reported as such.
struct Table {
    allowed: BTreeMap<String, BTreeSet<String>>,
    temporary: BTreeSet<(String, String)>,
}

fn parse_table(doc: &str) -> Table {
    let mut lines = doc.lines();
    lines.by_ref().find(|l| l.trim() == "```layers").expect("ARCHITECTURE.md has a ```layers block");
    let mut allowed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut temporary = BTreeSet::new();
    let mut in_temp = false;
    for raw in lines {
        if raw.trim() == "```" {
            return Table { allowed, temporary };
        }
        let t = raw.trim();
        if t.starts_with("# BEGIN temporary") {
            in_temp = true;
            continue;
        }
        if t.starts_with("# END temporary") {
            in_temp = false;
            continue;
        }
        let line = raw.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let (module, deps) =
            line.split_once(':').unwrap_or_else(|| panic!("layer table line without `module:`: {raw:?}"));
        let module = module.trim().to_string();
        let set = allowed.entry(module.clone()).or_default();
        for d in deps.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            set.insert(d.to_string());
            if in_temp {
                temporary.insert((module.clone(), d.to_string()));
            }
        }
    }
    panic!("the ```layers block of ARCHITECTURE.md is not closed");
}

/// Strongly connected components of more than one node (Tarjan, iterative enough for a
/// graph of twenty nodes to recurse).
fn cycles(nodes: &BTreeSet<String>, adj: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        adj: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit(t: &mut T, v: &str) {
        t.index.insert(v.to_string(), t.next);
        t.low.insert(v.to_string(), t.next);
        t.next += 1;
        t.stack.push(v.to_string());
        t.on.insert(v.to_string());
        let empty = BTreeSet::new();
        let succ: Vec<String> = t.adj.get(v).unwrap_or(&empty).iter().cloned().collect();
        for w in succ {
            if !t.index.contains_key(&w) {
                visit(t, &w);
                let lw = t.low[&w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(&w) {
                let iw = t.index[&w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        adj,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for n in nodes {
        if !t.index.contains_key(n) {
            visit(&mut t, n);
        }
    }
    t.out
}

/// A shortest cycle through `start` inside `comp` (BFS back to `start`).
fn cycle_through(start: &str, comp: &BTreeSet<String>, adj: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    let mut q = VecDeque::from([start.to_string()]);
    while let Some(v) = q.pop_front() {
        for w in adj.get(&v).into_iter().flatten() {
            if !comp.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![v.clone()];
                let mut cur = v.clone();
                while cur != start {
                    cur = prev[&cur].clone();
                    path.push(cur.clone());
                }
                path.reverse();
                path.push(start.to_string());
                return path;
            }
            if !prev.contains_key(w) && w != start {
                prev.insert(w.clone(), v.clone());
                q.push_back(w.clone());
            }
        }
    }
    unreachable!("{start} is in a strongly connected component")
}

fn adjacency(edges: &Edges) -> BTreeMap<String, BTreeSet<String>> {
    let mut adj: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        adj.entry(from.clone()).or_default().insert(to.clone());
    }
    adj
}

fn sites(edges: &Edges, from: &str, to: &str) -> String {
    let s = &edges[&(from.to_string(), to.to_string())];
    let mut v: Vec<String> = s.iter().take(3).map(|s| format!("{}:{}", s.file, s.line)).collect();
    if s.len() > 3 {
        v.push(format!("… {} in all", s.len()));
    }
    v.join(", ")
}

#[test]
fn module_graph_is_acyclic_and_layered() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (nodes, edges, unknown) = scan(&root.join("src"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let table = parse_table(&doc);
    let mut problems = Vec::new();
    problems.extend(unknown);

    // The table itself: names every module, names only modules (or ones on their way: a
    // table entry with no source yet is allowed, an edge to it is not checked), and is a DAG.
    for n in &nodes {
        if !table.allowed.contains_key(n) {
            problems.push(format!("module `{n}` is not in ARCHITECTURE.md's layer table"));
        }
    }
    let table_nodes: BTreeSet<String> =
        table.allowed.iter().flat_map(|(m, d)| std::iter::once(m.clone()).chain(d.iter().cloned())).collect();
    for c in cycles(&table_nodes, &table.allowed) {
        let comp: BTreeSet<String> = c.iter().cloned().collect();
        let cyc = cycle_through(&c[0], &comp, &table.allowed);
        problems.push(format!("the layer table itself has a cycle: {}", cyc.join(" -> ")));
    }

    // Edges the table forbids.
    for ((from, to), _) in edges.iter() {
        let ok = table.allowed.get(from).is_some_and(|a| a.contains(to));
        if !ok {
            problems.push(format!("forbidden edge {from} -> {to} ({})", sites(&edges, from, to)));
        }
    }

    // Cycles in the code.
    let adj = adjacency(&edges);
    for comp in cycles(&nodes, &adj) {
        // The group, then a shortest cycle through each of its modules not on one printed
        // yet, with the lines that make each edge.
        let set: BTreeSet<String> = comp.iter().cloned().collect();
        let mut msg = format!("cycle group {{{}}}", comp.join(", "));
        let mut covered = BTreeSet::new();
        for n in &comp {
            if covered.contains(n) {
                continue;
            }
            let cyc = cycle_through(n, &set, &adj);
            covered.extend(cyc.iter().cloned());
            msg.push_str(&format!("\n    cycle: {}", cyc.join(" -> ")));
            for w in cyc.windows(2) {
                msg.push_str(&format!("\n      {} -> {}: {}", w[0], w[1], sites(&edges, &w[0], &w[1])));
            }
        }
        problems.push(msg);
    }

    let temporary: Vec<String> = table
        .temporary
        .iter()
        .filter(|(f, t)| edges.contains_key(&(f.clone(), t.clone())))
        .map(|(f, t)| format!("{f} -> {t}"))
        .collect();
    if !temporary.is_empty() {
        eprintln!("temporary allowances still in use: {}", temporary.join(", "));
    }
    assert!(problems.is_empty(), "module graph: {} problem(s)\n  {}", problems.len(), problems.join("\n  "));
}

#[test]
fn the_scanner_reads_paths_as_written() {
    let src = r#"
use crate::{a, b::c, self, d::{e, f}};
use crate::g::h;
// crate::commented
/* crate::blocked /* nested crate::x */ */
fn f() { let s = "crate::in_string"; let r = r"crate::raw"; crate::inline::call(); let c = '{'; }
fn lt<'a>(x: &'a str) -> &'a str { crate::lifetimes::ok(x) }
#[cfg(test)]
mod tests { use crate::tested; }
#[cfg(test)]
use crate::test_use;
#[cfg(test)]
fn helper() { crate::test_fn(); }
fn after() { crate :: spaced::x(); }
"#;
    let code = blank_cfg_test(&blank_comments_and_literals(src));
    let got: Vec<String> = crate_paths(&code).into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, ["a", "b", "d", "g", "inline", "lifetimes", "spaced"]);
}
