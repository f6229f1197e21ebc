//! The one declaration of the ABI's numbered enums.

/// Declares a `#[repr(int)]` ABI enum whose variants are listed once with their numbers, with
/// its decoder and list: `from_raw` (`None` for a number no variant has) and `ALL` (every
/// variant, in declaration order). The encoder is `as` (`Op::Map as u16`).
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$($value),+].len()] = [$($name::$variant),+];

            /// Decodes a raw number; `None` for a number no variant has.
            pub const fn from_raw(raw: $repr) -> Option<$name> {
                match raw {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

/// Declares an ABI structure shared through guest memory: `#[repr(C)]` with zerocopy's derives
/// (no padding, every byte pattern a value, alignment 1), and compile-time checks that it is
/// `SIZE` bytes (`pub struct Name: SIZE`) and that every field sits at the offset written after
/// it (`pub field: Type @ offset`, the offset column of the structure's documented table).
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident: $size:tt {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:tt @ $offset:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::KnownLayout)]
        #[derive(zerocopy::Immutable, zerocopy::Unaligned)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)+
        }

        const _: () = {
            assert!(core::mem::size_of::<$name>() == $size);
            $(assert!(core::mem::offset_of!($name, $field) == $offset);)+
        };
    };
}
