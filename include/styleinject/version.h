#pragma once

// The one place the version is written: CMakeLists.txt reads these three
// lines, and adapter files record the resulting string.
#define STYLEINJECT_VERSION_MAJOR 0
#define STYLEINJECT_VERSION_MINOR 9
#define STYLEINJECT_VERSION_PATCH 0

#define STYLEINJECT_DETAIL_STRINGIFY_(x) #x
#define STYLEINJECT_DETAIL_STRINGIFY(x) STYLEINJECT_DETAIL_STRINGIFY_(x)

namespace styleinject {

/// The library's version as "major.minor.patch".
// clang-format off
inline constexpr const char* version =
    STYLEINJECT_DETAIL_STRINGIFY(STYLEINJECT_VERSION_MAJOR) "."
    STYLEINJECT_DETAIL_STRINGIFY(STYLEINJECT_VERSION_MINOR) "."
    STYLEINJECT_DETAIL_STRINGIFY(STYLEINJECT_VERSION_PATCH);
// clang-format on

} // namespace styleinject

#undef STYLEINJECT_DETAIL_STRINGIFY
#undef STYLEINJECT_DETAIL_STRINGIFY_
