//! The subset of Python's pickle that `torch.save(state_dict)` writes: enough to recover every
//! tensor's storage, dtype, offset, shape and stride — never executing anything.
//!
//! Unknown callables become opaque objects; only `_rebuild_tensor_v2`, `_rebuild_parameter` and
//! `OrderedDict` are understood. Malformed input is an error, never a panic.

use std::collections::HashMap;

/// A pickled value.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes.
    Long(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    /// `module.name`, e.g. `torch.FloatStorage`.
    Global(String, String),
    /// A persistent storage reference: (storage type name, key in `data/`, element count).
    Storage {
        kind: String,
        key: String,
        numel: usize,
    },
    /// A rebuilt tensor: a view into a storage.
    Tensor {
        storage: Box<Val>,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
    /// Anything else the file constructs; kept only so the stack stays consistent.
    Object(String),
    Mark,
}

/// Parses a pickle stream.
pub fn parse(data: &[u8]) -> Result<Val, String> {
    parse_prefix(data).map(|(v, _)| v)
}

/// Parses one pickle at the start of `data`; returns it and the bytes it took (legacy torch
/// files are several pickles back to back, then raw storage data).
pub fn parse_prefix(data: &[u8]) -> Result<(Val, usize), String> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let v = m.run()?;
    Ok((v, m.pos))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    memo: HashMap<u32, Val>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("pickle is truncated")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line in pickle")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Val, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Val>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Val::Mark)
            .ok_or("pickle has no MARK to pop to")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Val, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack is empty".to_string())
    }

    fn text(&mut self, n: usize) -> Result<Val, String> {
        let b = self.take(n)?;
        Ok(Val::Str(
            String::from_utf8(b.to_vec()).map_err(|_| "pickle string is not UTF-8")?,
        ))
    }

    fn run(&mut self) -> Result<Val, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Val::Dict(Vec::new())),
                b']' => self.stack.push(Val::List(Vec::new())),
                b')' => self.stack.push(Val::Tuple(Vec::new())),
                b'(' => self.stack.push(Val::Mark),
                b'N' => self.stack.push(Val::None),
                0x88 => self.stack.push(Val::Bool(true)),
                0x89 => self.stack.push(Val::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Val::Int(i64::from(v)));
                }
                b'M' => {
                    let b = self.take(2)?;
                    let v = u16::from_le_bytes([b[0], b[1]]);
                    self.stack.push(Val::Int(i64::from(v)));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Val::Int(i64::from(v)));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        let wide = b.to_vec();
                        self.stack.push(Val::Long(wide));
                        continue;
                    }
                    let mut v: i64 = 0;
                    for (i, byte) in b.iter().enumerate() {
                        v |= i64::from(*byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Val::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Val::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(if op == b'U' {
                        Val::Str(String::from_utf8_lossy(&v).into())
                    } else {
                        Val::Bytes(v)
                    });
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(if op == b'T' {
                        Val::Str(String::from_utf8_lossy(&v).into())
                    } else {
                        Val::Bytes(v)
                    });
                }
                b'q' => {
                    let i = u32::from(self.u8()?);
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        u32::from(self.u8()?)
                    } else {
                        self.u32()?
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| format!("pickle memo {i} is unset"))?;
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Val::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Val::Tuple(items));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Val::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Val::Str(m), Val::Str(n)) => self.stack.push(Val::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent(pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?);
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(Val::Object(format!("{cls:?}")));
                }
                b'b' => {
                    self.pop()?; // BUILD: object state (e.g. a state_dict's _metadata) is not needed.
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Val::Dict(d) => d.push((k, v)),
                        _ => return Err("SETITEM on a non-dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd item count".into());
                    }
                    let mut it = items.into_iter();
                    let top = self.top()?;
                    let Val::Dict(d) = top else {
                        return Err("SETITEMS on a non-dict".into());
                    };
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Val::List(l) => l.push(v),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Val::List(l) => l.extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

fn int(v: &Val) -> Result<usize, String> {
    match v {
        Val::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("expected a non-negative int, got {other:?}")),
    }
}

fn ints(v: &Val) -> Result<Vec<usize>, String> {
    match v {
        Val::Tuple(items) | Val::List(items) => items.iter().map(int).collect(),
        other => Err(format!("expected a tuple of ints, got {other:?}")),
    }
}

/// torch's persistent id: ('storage', <storage type>, key, location, numel[, view]).
fn persistent(pid: Val) -> Result<Val, String> {
    let Val::Tuple(items) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match items.as_slice() {
        // Legacy files add a sixth item, the view metadata (None for whole storages).
        [Val::Str(tag), kind, Val::Str(key), _location, numel, ..] if tag == "storage" => {
            let kind = match kind {
                Val::Global(_, name) => name.clone(),
                other => format!("{other:?}"),
            };
            Ok(Val::Storage {
                kind,
                key: key.clone(),
                numel: int(numel)?,
            })
        }
        _ => Err(format!("unknown persistent id {items:?}")),
    }
}

fn reduce(callable: Val, args: Val) -> Result<Val, String> {
    let Val::Global(module, name) = &callable else {
        return Ok(Val::Object(format!("{callable:?}")));
    };
    let Val::Tuple(a) = args else {
        return Err(format!("{module}.{name} called without a tuple"));
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            if a.len() < 4 {
                return Err(format!("{name} with {} arguments", a.len()));
            }
            Ok(Val::Tensor {
                storage: Box::new(a[0].clone()),
                offset: int(&a[1])?,
                shape: ints(&a[2])?,
                stride: ints(&a[3])?,
            })
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => a
            .into_iter()
            .next()
            .ok_or_else(|| "_rebuild_parameter without data".into()),
        ("collections", "OrderedDict") => Ok(Val::Dict(Vec::new())),
        _ => Ok(Val::Object(format!("{module}.{name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\x80\x02}q\x00(X\xff\xff\xff\x7f",
            b"\x80\x02\xff",
            b"\x80\x02h\x05.",
            b"\x80\x02s.",
        ] {
            assert!(parse(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn reads_a_small_dict() {
        // pickle.dumps({'a': 1, 'b': (2, 3)}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02K\x02K\x03\x86q\x03u.";
        let v = parse(bytes).unwrap();
        assert_eq!(
            v,
            Val::Dict(vec![
                (Val::Str("a".into()), Val::Int(1)),
                (
                    Val::Str("b".into()),
                    Val::Tuple(vec![Val::Int(2), Val::Int(3)])
                ),
            ])
        );
    }
}
