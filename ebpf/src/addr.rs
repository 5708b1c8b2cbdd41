//! Addresses as the two u64 words they are stored in.
//!
//! Every 16-byte address the programs touch (in `Packet`, `CtKey`, `EndpointInfo`, `FlowEvent`
//! and ring buffer records) sits at an 8-aligned offset of an 8-aligned struct, so it is read,
//! written and compared as two u64 words. Left to itself the compiler moves `[u8; 16]` a byte
//! at a time (and zero-fills with calls to a byte-wise `memset`): this module is what keeps a
//! parse, a key build or an address check to a handful of instructions.

#[cfg(not(target_endian = "little"))]
compile_error!("the word layout below assumes a little-endian target (bpfel)");

/// An address's 16 bytes in memory order, as two native u64 words.
pub type Words = [u64; 2];

/// Reads an address as words.
///
/// # Safety
/// `a` must be 8-aligned.
#[inline(always)]
pub unsafe fn get(a: &[u8; 16]) -> Words {
    // SAFETY: the caller guarantees the alignment; the sizes are equal.
    unsafe { *(a.as_ptr() as *const Words) }
}

/// Writes an address as words.
///
/// # Safety
/// `a` must be 8-aligned.
#[inline(always)]
pub unsafe fn set(a: &mut [u8; 16], w: Words) {
    // SAFETY: the caller guarantees the alignment; the sizes are equal.
    unsafe { *(a.as_mut_ptr() as *mut Words) = w }
}

/// `::ffff:a.b.c.d` from the IPv4 address's four bytes read as one native u32.
#[inline(always)]
pub fn v4_mapped(a: u32) -> Words {
    [0, 0xffff_0000 | ((a as u64) << 32)]
}

/// The IPv4 address (as its four bytes read as one native u32) of an IPv4-mapped address.
#[inline(always)]
pub fn v4_of(w: Words) -> u32 {
    (w[1] >> 32) as u32
}

/// Whether `a` sorts after `b` compared byte by byte (as `bulkhead_common::ct_swapped` compares
/// addresses): the big-endian value of each word orders like its bytes.
#[inline(always)]
pub fn greater(a: Words, b: Words) -> bool {
    let (a0, b0) = (u64::from_be(a[0]), u64::from_be(b[0]));
    if a0 != b0 {
        return a0 > b0;
    }
    u64::from_be(a[1]) > u64::from_be(b[1])
}
