// One Key Vault secret. keyvault.bicep calls this module only when a value is given, so
// re-provisioning without the value never overwrites (or empties) what is stored.

@description('Name of the existing Key Vault.')
param vaultName string

@description('Secret name.')
param name string

@secure()
@description('Secret value. Never an output.')
param value string

@description('Content type recorded on the secret.')
param contentType string = 'text/plain'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: name
  properties: {
    value: value
    contentType: contentType
  }
}

// Only the versionless URI (no value) is returned.
output uri string = secret.properties.secretUri
