//! Just enough of a BTF reader to find a struct member's offset in the running kernel
//! (/sys/kernel/btf/vmlinux). The HTTP verdict reads `tcp_sock.bytes_acked`, whose offset depends
//! on the kernel build; aya-ebpf cannot emit CO-RE relocations, so the control plane looks the
//! offset up here and hands it to the program as a load-time constant.

use std::io;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Raw BTF data.
pub struct Btf(Vec<u8>);

impl Btf {
    /// The running kernel's BTF.
    pub fn of_kernel() -> io::Result<Btf> {
        std::fs::read("/sys/kernel/btf/vmlinux").map(Btf)
    }

    /// Byte offset of `member` in `struct name`.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        member_offset(&self.0, name, member)
    }
}

/// Byte offset of `member` in `struct name` in raw BTF `data` (little-endian, as on x86-64).
fn member_offset(data: &[u8], name: &str, member: &str) -> Option<u32> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
    if u16_at(0)? != MAGIC {
        return None;
    }
    let header_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let types = header_len + type_off;
    let strings = header_len + str_off;
    let string = |offset: u32| {
        let start = strings + offset as usize;
        let end = start + data.get(start..)?.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&data[start..end]).ok()
    };
    let mut at = types;
    while at < types + type_len {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfields = info >> 31 == 1;
        at += 12;
        if kind == KIND_STRUCT && string(name_off) == Some(name) {
            for i in 0..vlen {
                let m = at + i * 12;
                if string(u32_at(m)?) == Some(member) {
                    let bits = u32_at(m + 8)?;
                    let bits = if bitfields { bits & 0x00ff_ffff } else { bits };
                    return (bits % 8 == 0).then_some(bits / 8);
                }
            }
            return None;
        }
        at += match kind {
            1 | 14 | 17 => 4,             // int, var, decl_tag
            3 => 12,                      // array
            4 | 5 | 15 | 19 => vlen * 12, // struct, union, datasec, enum64
            6 | 13 => vlen * 8,           // enum, func_proto
            _ => 0,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_fields_in_the_running_kernel() {
        let btf = Btf::of_kernel().unwrap();
        let field = |name| btf.member_offset("tcp_sock", name);
        let acked = field("bytes_acked").unwrap();
        assert_eq!(acked % 8, 0);
        assert!(acked > 1000 && acked < 4096, "{acked}");
        assert_ne!(Some(acked), field("bytes_received"));
        let (write_seq, snd_una) = (field("write_seq").unwrap(), field("snd_una").unwrap());
        assert!(write_seq % 4 == 0 && snd_una % 4 == 0 && write_seq != snd_una);
        assert_eq!(field("no_such_member"), None);
    }
}
