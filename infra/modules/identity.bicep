// User-assigned managed identity of the function app. It is the only credential the app has:
// host storage, deployment package, tables/queues, Key Vault and Application Insights all
// authenticate with it (no keys, no connection strings with secrets).

@description('Name of the user-assigned managed identity.')
param name string

@description('Azure region.')
param location string

@description('Tags applied to the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
