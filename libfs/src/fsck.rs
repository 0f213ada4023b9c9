//! fsck (to be written)
