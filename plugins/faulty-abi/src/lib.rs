//! Test fixture: a table that claims ABI version 999 (and whose layout the host must not read).

#[repr(C)]
pub struct FutureTable {
    pub abi_version: u32,
    pub something_new: u64,
}

static TABLE: FutureTable = FutureTable {
    abi_version: 999,
    something_new: 0xdead_beef,
};

#[no_mangle]
pub extern "C" fn gradalign_faulty_abi_plugin_table() -> *const FutureTable {
    &TABLE
}
