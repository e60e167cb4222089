//! A Python pickle reader (protocols 0 to 5) that builds a tree of values without running any
//! Python: a call of a global (`REDUCE`, `NEWOBJ`) becomes an [`Object`] recording the callable
//! and its arguments, and `BUILD` records its state there. The weight formats read on top of it
//! (PyTorch's `torch.save`, numpy arrays pickled by Python 2 or 3) interpret those objects.
//!
//! Why our own and not Candle's: Candle's reader knows only the opcodes of recent `torch.save`
//! files (no byte strings, no protocol 0, no frames), and its memo copies every value, so a
//! pickle that memoises its arrays would hold each one twice.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{bail, ensure, Context, Result};

/// A callable applied to arguments, as the pickle built it; `state` is what `BUILD` set.
#[derive(Debug)]
pub struct Object {
    pub callable: Value,
    pub args: Value,
    pub state: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A Python 3 `str`.
    Str(Rc<str>),
    /// `bytes`, `bytearray`, or a Python 2 `str` (read as latin1 bytes, as
    /// `pickle.load(f, encoding='latin1')` does for numpy data).
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion-ordered items (dict and OrderedDict).
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    Object(Rc<RefCell<Object>>),
    /// A persistent id (PyTorch's storages).
    Persistent(Rc<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Text from a Python 3 `str` or a Python 2 `str` (latin1 bytes).
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn tuple_items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.to_vec()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    /// `module.name` of a global.
    pub fn global_name(&self) -> Option<String> {
        match self {
            Value::Global(g) => Some(format!("{}.{}", g.0, g.1)),
            _ => None,
        }
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => format!("{s:?}"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(t) => format!("a tuple of {}", t.len()),
            Value::List(l) => format!("a list of {}", l.borrow().len()),
            Value::Dict(d) => format!("a dict of {}", d.borrow().len()),
            Value::Global(g) => format!("{}.{}", g.0, g.1),
            Value::Object(o) => format!("a {} object", o.borrow().callable.describe()),
            Value::Persistent(_) => "a persistent id".into(),
        }
    }
}

/// One pickle read from `data` starting at `*pos`; `*pos` ends just after its STOP opcode (a
/// file may hold several pickles in a row, as PyTorch's legacy format does).
pub fn load(data: &[u8], pos: &mut usize) -> Result<Value> {
    let mut m = Machine {
        data,
        pos: *pos,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Default::default(),
    };
    let v = m
        .run()
        .with_context(|| format!("pickle: at byte {}", m.pos))?;
    *pos = m.pos;
    Ok(v)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(
            self.pos + n <= self.data.len(),
            "truncated: {n} bytes wanted, {} left",
            self.data.len() - self.pos
        );
        let data: &'a [u8] = self.data;
        let s = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    /// A length prefix, checked against what is left so a corrupt file fails cleanly.
    fn len(&mut self, n: usize) -> Result<usize> {
        let l = self.le(n)?;
        ensure!(
            l <= (self.data.len() - self.pos) as u64,
            "length {l} runs past the end"
        );
        Ok(l as usize)
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .context("truncated: a text argument has no end of line")?;
        let s = String::from_utf8_lossy(&rest[..end])
            .trim_end_matches('\r')
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        ensure!(
            self.stack.len() > self.marks.last().copied().unwrap_or(0),
            "stack underflow"
        );
        Ok(self.stack.pop().expect("checked"))
    }

    fn top(&mut self) -> Result<&Value> {
        self.stack.last().context("stack underflow")
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.marks.pop().context("no MARK to pop to")?;
        Ok(self.stack.split_off(at))
    }

    fn memo_get(&self, id: u64) -> Result<Value> {
        self.memo
            .get(&id)
            .cloned()
            .with_context(|| format!("memo entry {id} was never stored"))
    }

    fn memo_put(&mut self, id: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(id, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        ensure!(
            items.len().is_multiple_of(2),
            "SETITEMS with an odd item count"
        );
        let Value::Dict(d) = self.top()?.clone() else {
            bail!("SETITEM on {}, not a dict", self.top()?.describe());
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.borrow_mut().push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()?.clone() {
            Value::List(l) => l.borrow_mut().extend(items),
            other => bail!("APPEND on {}, not a list", other.describe()),
        }
        Ok(())
    }

    /// A call of `callable(*args)`: the few builtins whose result is data become that data;
    /// everything else is kept as an [`Object`] for the format readers.
    fn call(callable: Value, args: Value) -> Result<Value> {
        let name = callable.global_name().unwrap_or_default();
        let items = args.tuple_items().unwrap_or_default();
        Ok(match name.as_str() {
            "collections.OrderedDict" | "builtins.dict" | "__builtin__.dict"
                if items.is_empty() =>
            {
                Value::Dict(Default::default())
            }
            // Python 3 writes bytes at protocol < 3 as `_codecs.encode(text, 'latin1')`.
            "_codecs.encode" => match items.first() {
                Some(Value::Str(s)) => Value::Bytes(s.chars().map(|c| c as u8).collect()),
                _ => bail!("_codecs.encode without a text argument"),
            },
            "builtins.bytes" | "builtins.bytearray" | "__builtin__.bytearray" => {
                match items.first() {
                    None => Value::Bytes(Rc::from(Vec::new())),
                    Some(Value::Bytes(b)) => Value::Bytes(b.clone()),
                    Some(Value::Str(s)) => Value::Bytes(s.chars().map(|c| c as u8).collect()),
                    Some(other) => bail!("{name} of {}", other.describe()),
                }
            }
            _ => Value::Object(Rc::new(RefCell::new(Object {
                callable,
                args,
                state: None,
            }))),
        })
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    let p = self.byte()?;
                    ensure!(p <= 5, "pickle protocol {p} (this reader knows 0 to 5)");
                }
                0x95 => {
                    self.le(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                // Integers and floats.
                b'I' => {
                    let s = self.line()?;
                    self.stack.push(match s.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(s.parse().with_context(|| format!("INT {s:?}"))?),
                    });
                }
                b'L' => {
                    let s = self.line()?;
                    let s = s.trim_end_matches('L');
                    self.stack.push(Value::Int(
                        s.parse().with_context(|| format!("LONG {s:?}"))?,
                    ));
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.byte()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.byte()? as usize
                    } else {
                        self.len(4)?
                    };
                    let b = self.take(n)?;
                    // Little-endian two's complement; PyTorch's legacy magic number needs 80
                    // bits, so anything wider than 64 is kept as its low 64 bits.
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate().take(8) {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'F' => {
                    let s = self.line()?;
                    self.stack.push(Value::Float(
                        s.parse().with_context(|| format!("FLOAT {s:?}"))?,
                    ));
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack
                        .push(Value::Float(f64::from_be_bytes(b.try_into().expect("8"))));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                // Byte strings (Python 2 str, bytes, bytearray).
                b'S' => {
                    let s = self.line()?;
                    self.stack
                        .push(Value::Bytes(Rc::from(py2_string_literal(&s)?)));
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'U' | b'C' => self.byte()? as usize,
                        b'T' | b'B' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                // Text.
                b'V' => {
                    let s = self.line()?;
                    self.stack
                        .push(Value::Str(Rc::from(raw_unicode_escape(&s)?)));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.byte()? as usize,
                        b'X' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?.to_vec();
                    let s = String::from_utf8(b).context("BINUNICODE is not UTF-8")?;
                    self.stack.push(Value::Str(Rc::from(s)));
                }
                // Containers.
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self.stack.push(Value::List(Default::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.stack.push(Value::Dict(Default::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Default::default()));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // Sets: kept as lists (no weight format uses them).
                0x8f => self.stack.push(Value::List(Default::default())),
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                // Memo.
                b'p' => {
                    let id = self.line()?.parse().context("PUT index")?;
                    self.memo_put(id)?;
                }
                b'q' => {
                    let id = self.byte()? as u64;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.le(4)?;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = self.memo.len() as u64;
                    self.memo_put(id)?;
                }
                b'g' => {
                    let id = self.line()?.parse().context("GET index")?;
                    let v = self.memo_get(id)?;
                    self.stack.push(v);
                }
                b'h' => {
                    let id = self.byte()? as u64;
                    let v = self.memo_get(id)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let id = self.le(4)?;
                    let v = self.memo_get(id)?;
                    self.stack.push(v);
                }
                // Globals, calls, state.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(Rc::new((module, name))));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        bail!("STACK_GLOBAL needs two strings");
                    };
                    self.stack
                        .push(Value::Global(Rc::new((m.to_string(), n.to_string()))));
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = Self::call(callable, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = Self::call(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    // Attributes of a dict (OrderedDict's `_metadata`) do not matter here.
                    if let Value::Object(o) = self.top()? {
                        o.borrow_mut().state = Some(state);
                    }
                }
                b'P' => {
                    let id = self.line()?;
                    self.stack
                        .push(Value::Persistent(Rc::new(Value::Str(Rc::from(id)))));
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(Value::Persistent(Rc::new(id)));
                }
                0x98 => {} // READONLY_BUFFER: no-op on in-band data
                0x97 => bail!("out-of-band pickle buffers (NEXT_BUFFER) are not supported"),
                b'i' | b'o' => bail!(
                    "old-style class instances (opcode {:?}) are not supported",
                    op as char
                ),
                other => bail!("unknown pickle opcode 0x{other:02x}"),
            }
        }
    }
}

/// A protocol-0 `STRING` argument: a Python 2 `repr` of a byte string, in single or double
/// quotes, with backslash escapes.
fn py2_string_literal(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    ensure!(
        b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0],
        "STRING argument is not quoted"
    );
    let body = &b[1..b.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(i).context("STRING ends in a backslash")?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\\' | b'\'' | b'"' => out.push(e),
            b'\n' => {}
            b'x' => {
                let hex = body.get(i..i + 2).context("STRING: short \\x escape")?;
                let v = u8::from_str_radix(std::str::from_utf8(hex)?, 16)
                    .context("STRING: bad \\x escape")?;
                out.push(v);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match body.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Ok(out)
}

/// A protocol-0 `UNICODE` argument: raw-unicode-escape (`\uXXXX` and `\UXXXXXXXX` only).
fn raw_unicode_escape(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some('u') | Some('U')) {
            let n = if chars.next() == Some('u') { 4 } else { 8 };
            let hex: String = chars.by_ref().take(n).collect();
            let v = u32::from_str_radix(&hex, 16).context("UNICODE: bad escape")?;
            out.push(char::from_u32(v).context("UNICODE: not a character")?);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python2_string_literals_and_long_ints() {
        assert_eq!(
            py2_string_literal(r"'a\x00\xff\n\\\'b'").unwrap(),
            b"a\x00\xff\n\\'b"
        );
        assert_eq!(py2_string_literal(r#""it's""#).unwrap(), b"it's");
        assert_eq!(py2_string_literal(r"'\101\0'").unwrap(), b"A\0");
        // PROTO 2, LONG1 of -2 (one byte 0xfe), STOP.
        let mut pos = 0;
        let v = load(&[0x80, 2, 0x8a, 1, 0xfe, b'.'], &mut pos).unwrap();
        assert_eq!(v.as_int(), Some(-2));
        assert_eq!(pos, 6);
        // Errors name the problem instead of panicking.
        let e = load(&[0x80, 2, b'X', 9, 0, 0, 0, b'a'], &mut 0).unwrap_err();
        assert!(format!("{e:#}").contains("runs past the end"), "{e:#}");
        let e = load(&[0x80, 2, 0xff], &mut 0).unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown pickle opcode 0xff"),
            "{e:#}"
        );
    }
}
