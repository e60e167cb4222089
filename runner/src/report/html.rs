//! `fer report NAME --html`: the same report as one self-contained HTML file, openable from a
//! cluster's file system or an e-mail: the Markdown page converted, its figures and the trials'
//! pictures inlined as data URIs (no script, no network).
//!
//! The converter knows exactly the Markdown `render::markdown` writes (headings, tables, bullet
//! lists, paragraphs, images, links, `**bold**`, `` `code` ``, the `<details>` block). Every text is
//! HTML-escaped before any markup is added, so a sweep value, label, note or error containing
//! HTML shows as text.

use std::path::Path;

use anyhow::Context;
use base64::Engine;

/// `s` with `& < > " '` escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn data_uri(path: &Path) -> anyhow::Result<String> {
    let mime = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => "image/svg+xml",
        _ => "image/png",
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Pictures linked from the page, inlined at its end.
struct Pictures<'a> {
    dir: &'a Path,
    items: Vec<(String, String)>,
}

impl Pictures<'_> {
    /// Inline markup of escaped text: bold, code, links (a linked picture becomes an anchor to
    /// its copy at the end of the page; other links keep their text only).
    fn inline(&mut self, escaped: &str) -> anyhow::Result<String> {
        let mut out = String::new();
        let mut rest = escaped;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("**") {
                if let Some(end) = after.find("**") {
                    out.push_str(&format!("<strong>{}</strong>", self.inline(&after[..end])?));
                    rest = &after[end + 2..];
                    continue;
                }
            }
            if let Some(after) = rest.strip_prefix('`') {
                if let Some(end) = after.find('`') {
                    out.push_str(&format!("<code>{}</code>", &after[..end]));
                    rest = &after[end + 1..];
                    continue;
                }
            }
            if let Some(after) = rest.strip_prefix('[') {
                if let Some((text, target, len)) = link(after) {
                    if target.ends_with(".png") && self.dir.join(target).is_file() {
                        let id = format!("picture-{}", self.items.len());
                        self.items
                            .push((target.to_string(), data_uri(&self.dir.join(target))?));
                        out.push_str(&format!("<a href=\"#{id}\">{text}</a>"));
                    } else {
                        out.push_str(text);
                    }
                    rest = &after[len..];
                    continue;
                }
            }
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        Ok(out)
    }
}

/// `text](target)` at the start of `s`: (text, target, bytes used).
fn link(s: &str) -> Option<(&str, &str, usize)> {
    let close = s.find("](")?;
    let end = s[close + 2..].find(')')?;
    Some((
        &s[..close],
        &s[close + 2..close + 2 + end],
        close + 2 + end + 1,
    ))
}

/// `![alt](file)` alone on a line.
fn image(line: &str) -> Option<(&str, &str)> {
    let (text, target, len) = link(line.strip_prefix("![")?)?;
    (len + 2 == line.len()).then_some((text, target))
}

/// The report page `md` (written into `dir`, whose figures and pictures it links) as HTML.
pub fn from_markdown(md: &str, dir: &Path, title: &str) -> anyhow::Result<String> {
    let mut pics = Pictures {
        dir,
        items: Vec::new(),
    };
    let mut body = String::new();
    let lines: Vec<&str> = md.lines().collect();
    let mut i = 0;
    let mut paragraph: Vec<String> = Vec::new();
    let flush = |paragraph: &mut Vec<String>, body: &mut String| {
        if !paragraph.is_empty() {
            body.push_str(&format!("<p>{}</p>\n", paragraph.join("\n")));
            paragraph.clear();
        }
    };
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() {
            flush(&mut paragraph, &mut body);
        } else if line.starts_with("<!-- fer-report ") && line.ends_with("-->") {
            // The provenance comment of the Markdown page (commands, sweep file): kept as text.
            body.push_str(&format!(
                "<!-- {} -->\n",
                escape(&line[5..line.len() - 3]).replace("--", "- -")
            ));
        } else if let Some(h) = line.strip_prefix("## ") {
            flush(&mut paragraph, &mut body);
            body.push_str(&format!("<h2>{}</h2>\n", pics.inline(&escape(h))?));
        } else if let Some(h) = line.strip_prefix("# ") {
            flush(&mut paragraph, &mut body);
            body.push_str(&format!("<h1>{}</h1>\n", pics.inline(&escape(h))?));
        } else if let Some(s) = line
            .strip_prefix("<details><summary>")
            .and_then(|s| s.strip_suffix("</summary>"))
        {
            flush(&mut paragraph, &mut body);
            body.push_str(&format!("<details><summary>{}</summary>\n", escape(s)));
        } else if line == "</details>" {
            flush(&mut paragraph, &mut body);
            body.push_str("</details>\n");
        } else if line.starts_with('|') {
            flush(&mut paragraph, &mut body);
            body.push_str("<table>\n");
            let mut row = 0;
            while i < lines.len() && lines[i].starts_with('|') {
                let cells: Vec<&str> = lines[i].trim().trim_matches('|').split('|').collect();
                if !cells.iter().all(|c| c.trim().chars().all(|ch| ch == '-')) {
                    let tag = if row == 0 { "th" } else { "td" };
                    body.push_str("<tr>");
                    for c in cells {
                        body.push_str(&format!(
                            "<{tag}>{}</{tag}>",
                            pics.inline(&escape(c.trim()))?
                        ));
                    }
                    body.push_str("</tr>\n");
                    row += 1;
                }
                i += 1;
            }
            body.push_str("</table>\n");
            continue;
        } else if line.starts_with("- ") {
            flush(&mut paragraph, &mut body);
            body.push_str("<ul>\n");
            while i < lines.len() && lines[i].starts_with("- ") {
                body.push_str(&format!(
                    "<li>{}</li>\n",
                    pics.inline(&escape(&lines[i][2..]))?
                ));
                i += 1;
            }
            body.push_str("</ul>\n");
            continue;
        } else if let Some((alt, target)) = image(line) {
            flush(&mut paragraph, &mut body);
            // The SVG when there is one (sharp at any zoom), inside <img> (no script runs).
            let svg = dir.join(target).with_extension("svg");
            let file = if svg.is_file() { svg } else { dir.join(target) };
            if file.is_file() {
                body.push_str(&format!(
                    "<figure><img src=\"{}\" alt=\"{}\"></figure>\n",
                    data_uri(&file)?,
                    escape(alt)
                ));
            }
        } else if line.starts_with("([SVG](") {
            // The figure is inline already.
        } else {
            paragraph.push(pics.inline(&escape(line))?);
        }
        i += 1;
    }
    flush(&mut paragraph, &mut body);
    if !pics.items.is_empty() {
        body.push_str("<h2>Trial pictures</h2>\n");
        for (n, (name, uri)) in pics.items.iter().enumerate() {
            body.push_str(&format!(
                "<figure id=\"picture-{n}\"><img src=\"{uri}\" alt=\"{0}\"><figcaption>{0}</figcaption></figure>\n",
                escape(name)
            ));
        }
    }
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    ))
}

const STYLE: &str = "body { font-family: system-ui, sans-serif; max-width: 75rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; }
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_before_markup() {
        let dir = std::env::temp_dir();
        let md = "# T <script>alert(1)</script>\n\n- **a<b** `c&d` [x](y.md)\n\n| h | <i>h2</i> |\n|---|---|\n| 1 | \"q\" |\n\nplain <img src=x onerror=alert(2)>\n";
        let html = from_markdown(md, &dir, "t<").unwrap();
        assert!(!html.contains("<script") && !html.contains("<img src=x") && !html.contains("<i>"));
        assert!(
            html.contains("<h1>T &lt;script&gt;alert(1)&lt;/script&gt;</h1>"),
            "{html}"
        );
        assert!(
            html.contains("<li><strong>a&lt;b</strong> <code>c&amp;d</code> x</li>"),
            "{html}"
        );
        assert!(
            html.contains("<th>&lt;i&gt;h2&lt;/i&gt;</th>")
                && html.contains("<td>&quot;q&quot;</td>")
        );
        assert!(html.contains("<title>t&lt;</title>"));
    }
}
